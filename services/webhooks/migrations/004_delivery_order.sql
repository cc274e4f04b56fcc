-- Order per resource: a delivery carries its event's resource (`ordering_key`, within the
-- school) and the source's sequence (the school API's outbox id, in commit order). Of one
-- subscription's pending deliveries of one resource, only the earliest is sendable; the
-- others are `held` until it is delivered, dead or cancelled (store/ordering.py releases the
-- next). Held rows are out of the claim's index, so a long line behind one resource costs
-- the claim nothing.
ALTER TABLE webhooks.deliveries
    ADD COLUMN ordering_key text,
    ADD COLUMN sequence     bigint,
    ADD COLUMN held         boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT deliveries_ordered CHECK ((ordering_key IS NULL) = (sequence IS NULL)),
    ADD CONSTRAINT deliveries_held_ordered CHECK (NOT held OR ordering_key IS NOT NULL);

DROP INDEX webhooks.deliveries_due;
CREATE INDEX deliveries_due ON webhooks.deliveries (subscription_id, next_attempt_at)
    WHERE status = 'pending' AND NOT held;

-- Per (subscription, resource): is one sendable, and which held one is earliest.
CREATE INDEX deliveries_pending_by_resource
    ON webhooks.deliveries (subscription_id, ordering_key, held, sequence)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
