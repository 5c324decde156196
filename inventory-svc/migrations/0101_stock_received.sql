-- The stock ledger: every unit ever put in stock, kept by SetStock (the seed and restocks add,
-- lowering the available units takes away). Units only move between buckets otherwise, so an
-- audit can check that none appeared or vanished:
--     received = available + reserved + committed + written_off
ALTER TABLE stock ADD COLUMN received BIGINT NOT NULL DEFAULT 0;

-- Every unit in stock now was received; written-off ones too where write-offs exist already.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'stock'
                 AND column_name = 'written_off') THEN
        EXECUTE 'UPDATE stock SET received = available + reserved + committed + written_off';
    ELSE
        UPDATE stock SET received = available + reserved + committed;
    END IF;
END
$$;
