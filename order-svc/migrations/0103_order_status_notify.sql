-- Wakes the requests waiting for an order's status to change (GetOrder's long poll), in
-- whichever replica of the service they are.
CREATE FUNCTION order_status_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_status', NEW.order_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER order_status_notify AFTER UPDATE OF status ON orders
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION order_status_notify();
