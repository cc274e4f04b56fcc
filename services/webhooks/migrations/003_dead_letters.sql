-- Stream entries no consumer can handle (not a JSON object, not an event, refused by
-- PostgreSQL): set aside here, acknowledged, so one bad entry never stops the entries behind
-- it nor ends its consumer. The payload is kept as it came (it may hold personal data, like
-- any event body: the logs name only the entry id); purged with the delivery log.
CREATE TABLE webhooks.dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL,
    entry_id    text        NOT NULL,
    reason      text        NOT NULL,
    payload     bytea       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- A batch set aside twice (its consumer died before acknowledging) is one row per entry.
    CONSTRAINT dead_letters_once UNIQUE (stream, entry_id)
);
CREATE INDEX dead_letters_received ON webhooks.dead_letters (received_at);
