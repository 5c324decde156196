-- The notification of a status change carries the change itself (the order's lines never
-- change), so that a waiting GetOrder answers without reading the order again:
-- "<order_id> <status> <payment_id or -> <updated_at in µs since 1970> <-, or + and the failure reason>".
-- A payload that would not fit NOTIFY's limit is the bare order id, and waiters read the order.
CREATE OR REPLACE FUNCTION order_status_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text := NEW.order_id::text || ' ' || NEW.status || ' '
        || coalesce(NEW.payment_id::text, '-') || ' '
        || (extract(epoch FROM NEW.updated_at) * 1000000)::bigint || ' '
        || coalesce('+' || NEW.failure_reason, '-');
BEGIN
    IF octet_length(payload) > 7000 THEN
        payload := NEW.order_id::text;
    END IF;
    PERFORM pg_notify('order_status', payload);
    RETURN NULL;
END
$$;
