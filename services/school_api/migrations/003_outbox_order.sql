-- Order per resource. An event's resource (`course:12`, `settings:7`, ...) within its school:
-- relays publish a resource's events only in id order, which is their commit order (every
-- change enqueues its event after writing its row, whose lock it holds until commit, so a
-- later change of the same row gets a later id). A row is held back while an older one of
-- the same resource is unpublished (another relay has it in flight, or it was rewound after a
-- Redis loss).
ALTER TABLE school_api.outbox ADD COLUMN ordering_key text;

CREATE INDEX outbox_unpublished_by_resource ON school_api.outbox (school_id, ordering_key, id)
    WHERE published_at IS NULL;
