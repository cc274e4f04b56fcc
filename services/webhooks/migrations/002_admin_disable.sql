-- A school admin may switch a subscription off from the admin pages. Its own reason keeps the
-- admin's choice apart from the app's ('client'), so the admin pages can tell who did it and
-- the app cannot silently undo it.

ALTER TABLE webhooks.subscriptions DROP CONSTRAINT subscriptions_disabled_reason_check;
ALTER TABLE webhooks.subscriptions ADD CONSTRAINT subscriptions_disabled_reason_check
    CHECK (disabled_reason IN ('gone', 'failing', 'grant_revoked', 'client', 'admin'));

-- The admin list shows a school's subscriptions newest first, over all its apps.
CREATE INDEX subscriptions_school ON webhooks.subscriptions (school_id, created_at DESC, id DESC);
