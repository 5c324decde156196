-- The headers an outbox row sends besides its envelope's (a dead letter's error and origin)
-- become a jsonb array of [key, value] pairs, in the order they are sent, instead of a
-- home-made binary encoding: PostgreSQL reads them (`extra_headers -> 0 ->> 1`), and so does
-- an operator looking at a parked row. An array of pairs, not an object, because Kafka
-- headers are an ordered list in which a key may repeat.
--
-- Rows written before (published or parked later) are converted. Their encoding: for each
-- key, then each value, a 4-byte big-endian length and that many bytes of UTF-8; an
-- incomplete trailing part, or a key without a value, was ignored by the reader, and is here.
CREATE FUNCTION outbox_headers_from_length_prefixed(encoded BYTEA) RETURNS JSONB
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    parts TEXT[] := '{}';
    pairs JSONB := '[]';
    at BIGINT := 0;
    len BIGINT;
BEGIN
    WHILE length(encoded) - at >= 4 LOOP
        len := (get_byte(encoded, at::int)::bigint << 24) | (get_byte(encoded, at::int + 1) << 16)
             | (get_byte(encoded, at::int + 2) << 8) | get_byte(encoded, at::int + 3);
        EXIT WHEN at + 4 + len > length(encoded);
        parts := parts || convert_from(substring(encoded FROM (at + 5)::int FOR len::int), 'UTF8');
        at := at + 4 + len;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(parts, 1), 0) / 2 LOOP
        pairs := pairs || jsonb_build_array(jsonb_build_array(parts[2 * i - 1], parts[2 * i]));
    END LOOP;
    RETURN pairs;
END
$$;

ALTER TABLE outbox
    ALTER COLUMN extra_headers DROP DEFAULT,
    ALTER COLUMN extra_headers TYPE JSONB USING outbox_headers_from_length_prefixed(extra_headers),
    ALTER COLUMN extra_headers SET DEFAULT '[]';

ALTER TABLE outbox_parked
    ALTER COLUMN extra_headers DROP DEFAULT,
    ALTER COLUMN extra_headers TYPE JSONB USING outbox_headers_from_length_prefixed(extra_headers),
    ALTER COLUMN extra_headers SET DEFAULT '[]';

DROP FUNCTION outbox_headers_from_length_prefixed(BYTEA);

-- The relay reads every row's headers as pairs of strings: a row of another shape would stop
-- it, so none is let in.
ALTER TABLE outbox ADD CONSTRAINT outbox_extra_headers_are_pairs CHECK (
    CASE WHEN jsonb_typeof(extra_headers) = 'array' THEN NOT jsonb_path_exists(extra_headers,
        'strict $[*] ? (@.type() != "array" || @.size() != 2 || @[0].type() != "string" || @[1].type() != "string")')
    ELSE false END);
ALTER TABLE outbox_parked ADD CONSTRAINT outbox_parked_extra_headers_are_pairs CHECK (
    CASE WHEN jsonb_typeof(extra_headers) = 'array' THEN NOT jsonb_path_exists(extra_headers,
        'strict $[*] ? (@.type() != "array" || @.size() != 2 || @[0].type() != "string" || @[1].type() != "string")')
    ELSE false END);
