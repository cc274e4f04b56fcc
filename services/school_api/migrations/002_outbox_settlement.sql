-- An event on the stream is not yet safe: a Redis that restarts empty (or a failover that
-- loses the last writes) takes it along if the dispatcher has not read it. So the relay
-- remembers where it put each event (the entry id, and the run_id of the Redis that took it)
-- and keeps the row until the dispatcher's consumer group has acknowledged that entry (which
-- it does only once the deliveries are recorded in PostgreSQL): `settled_at`. A published,
-- unsettled row whose Redis is no longer the one answering is published again.
ALTER TABLE school_api.outbox
    ADD COLUMN stream_id     text,
    ADD COLUMN published_run text,
    ADD COLUMN settled_at    timestamptz;

-- What was published before is taken as settled: nothing is known of it to publish again.
UPDATE school_api.outbox SET settled_at = published_at WHERE published_at IS NOT NULL;

CREATE INDEX outbox_unsettled ON school_api.outbox (id)
    WHERE published_at IS NOT NULL AND settled_at IS NULL;
