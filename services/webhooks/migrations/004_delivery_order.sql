-- Order per resource: a delivery carries its event's resource (`ordering_key`, within the
-- school) and the source's sequence (the school API's outbox id, in commit order). A sender
-- takes a resource's next delivery to a subscription only when no earlier one of that
-- resource is still pending for it (being sent, or waiting for a retry): delivered, dead or
-- cancelled first.
ALTER TABLE webhooks.deliveries
    ADD COLUMN ordering_key text,
    ADD COLUMN sequence     bigint,
    ADD CONSTRAINT deliveries_ordered CHECK ((ordering_key IS NULL) = (sequence IS NULL));

CREATE INDEX deliveries_pending_by_resource
    ON webhooks.deliveries (subscription_id, ordering_key, sequence)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
