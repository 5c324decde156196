-- A consumer batch that a handler writes in one statement with no transaction around it
-- (messaging::Handler::takes_alone) must write all of its effects or none: the statement calls
-- this when what it wrote is not all it meant to (a row not at the version the handler
-- remembered, a row there already, a message in the inbox already: handled before), and the
-- error rolls the whole statement back. The consumer then handles the batch in a transaction,
-- from what is stored.
CREATE FUNCTION consumer_batch_refused(written BIGINT, meant BIGINT, recorded BIGINT, messages BIGINT)
RETURNS BIGINT LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consumer batch not written alone: % of % rows written, % of % messages new',
        written, meant, recorded, messages
        USING ERRCODE = 'serialization_failure';
END
$$;
