-- The relay is woken in memory by the writers of its own process, and by a NOTIFY from the
-- writers of other replicas only (messaging/src/outbox.rs): no trigger notifies on every
-- insert any more (a NOTIFY serializes the commits that send one, WAL flush included).
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
