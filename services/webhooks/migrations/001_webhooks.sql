-- Webhooks: subscriptions, the events they matched, one delivery per (subscription, event),
-- and every attempt to send it. PostgreSQL is the queue: a delivery is due when it is
-- `pending` and its `next_attempt_at` has passed, and senders claim due rows with
-- FOR UPDATE SKIP LOCKED plus a lease, so any number of processes can send and a restart
-- loses nothing.
--
-- Everything lives in its own schema, like school_api's, so names the school world shares
-- (events, subscriptions) never collide. There is no foreign key into identity's tables: the
-- school, client and grant are what the gateway vouches for, and revocations arrive on
-- `connect:revocations`.

CREATE SCHEMA webhooks;

CREATE TABLE webhooks.subscriptions (
    id                  uuid        PRIMARY KEY,
    school_id           bigint      NOT NULL,
    client_id           text        NOT NULL,
    -- The consent the subscription delivers under; it stops when this grant is revoked.
    grant_id            uuid        NOT NULL,
    subject             text,
    url                 text        NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    event_types         text[]      NOT NULL CHECK (cardinality(event_types) BETWEEN 1 AND 100),
    description         text        NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    -- The signing secret, AES-256-GCM under the key-encryption key with the subscription id
    -- as associated data: 12-byte nonce, then ciphertext and tag. Signing needs the
    -- plaintext, so a hash would not do.
    secret_enc          bytea       NOT NULL,
    -- The secret a rotation replaced: deliveries are signed with it too until it expires.
    previous_secret_enc bytea,
    previous_secret_expires_at timestamptz,
    kek_id              text        NOT NULL,
    disabled_at         timestamptz,
    disabled_reason     text        CHECK (disabled_reason IN
                                           ('gone', 'failing', 'grant_revoked', 'client')),
    -- The first failure since the last success; a long enough streak disables.
    failing_since       timestamptz,
    -- When the endpoint.disabled event of the current disablement reached the stream.
    disabled_announced_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((disabled_at IS NULL) = (disabled_reason IS NULL)),
    CHECK ((previous_secret_enc IS NULL) = (previous_secret_expires_at IS NULL))
);
CREATE INDEX subscriptions_owner ON webhooks.subscriptions (school_id, client_id, created_at, id);
CREATE INDEX subscriptions_active ON webhooks.subscriptions (school_id) WHERE disabled_at IS NULL;
CREATE INDEX subscriptions_grant ON webhooks.subscriptions (grant_id);
CREATE INDEX subscriptions_unannounced ON webhooks.subscriptions (disabled_at)
    WHERE disabled_reason IN ('gone', 'failing') AND disabled_announced_at IS NULL;

-- Grants seen on connect:revocations. A subscription created in the instant a revocation is
-- being applied checks here under the same advisory lock, so it cannot slip through.
CREATE TABLE webhooks.revoked_grants (
    grant_id            uuid        PRIMARY KEY,
    reason              text,
    revoked_at          timestamptz NOT NULL DEFAULT now()
);

-- An event that matched at least one subscription, with the exact bytes every attempt signs
-- and sends. Keyed by school too, so two schools' events can never be confused.
CREATE TABLE webhooks.events (
    school_id           bigint      NOT NULL,
    id                  text        NOT NULL,
    type                text        NOT NULL,
    body                bytea       NOT NULL,
    stream_id           text,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (school_id, id)
);
CREATE INDEX events_received ON webhooks.events (received_at);

CREATE TABLE webhooks.deliveries (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    subscription_id     uuid        NOT NULL REFERENCES webhooks.subscriptions (id) ON DELETE CASCADE,
    school_id           bigint      NOT NULL,
    event_id            text        NOT NULL,
    event_type          text        NOT NULL,
    status              text        NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempt_count       integer     NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz,
    -- A sender's lease: the row is being sent until then. A sender that died leaves a lease
    -- that runs out, and the delivery is claimed again.
    locked_until        timestamptz,
    locked_by           text,
    -- A retry asked for by the client: one attempt, then back to the dead-letter list.
    manual              boolean     NOT NULL DEFAULT false,
    last_response_status integer,
    delivered_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- A stream entry dispatched twice (a dispatcher died before acknowledging) is one delivery.
    CONSTRAINT deliveries_once UNIQUE (subscription_id, event_id),
    FOREIGN KEY (school_id, event_id) REFERENCES webhooks.events (school_id, id) ON DELETE CASCADE,
    CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);
-- The claim walks the subscriptions with due work along this index, one probe each, so an
-- endpoint with a large backlog costs one probe, not a scan of its backlog.
CREATE INDEX deliveries_due ON webhooks.deliveries (subscription_id, next_attempt_at)
    WHERE status = 'pending';
-- Small: only rows being sent. The claim counts them per subscription to bound concurrency.
CREATE INDEX deliveries_leased ON webhooks.deliveries (subscription_id)
    WHERE locked_until IS NOT NULL;
CREATE INDEX deliveries_log ON webhooks.deliveries (subscription_id, created_at DESC, id DESC);
CREATE INDEX deliveries_event ON webhooks.deliveries (school_id, event_id);

CREATE TABLE webhooks.attempts (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id         uuid        NOT NULL REFERENCES webhooks.deliveries (id) ON DELETE CASCADE,
    attempted_at        timestamptz NOT NULL,
    -- NULL when no HTTP answer came back (timeout, refused address, connection error).
    response_status     integer,
    latency_ms          integer     NOT NULL,
    response_excerpt    text,
    error               text,
    outcome             text        NOT NULL
                        CHECK (outcome IN ('delivered', 'retry', 'dead', 'gone', 'cancelled')),
    next_attempt_at     timestamptz
);
CREATE INDEX attempts_delivery ON webhooks.attempts (delivery_id, id);

-- Senders in every process LISTEN on `webhooks_due`. NOTIFY is transactional: they are
-- woken when new deliveries commit, never for a rollback, once per statement.
CREATE FUNCTION webhooks.notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('webhooks_due', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER deliveries_notify_due AFTER INSERT ON webhooks.deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION webhooks.notify_due();
