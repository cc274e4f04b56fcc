-- An upload whose bytes never arrived, or that was never confirmed, is swept after its URL
-- expired: its stored bytes (if any) deleted and the row kept as `expired`, so a late confirm
-- answers 409 upload_expired rather than 404.
ALTER TABLE school_api.uploads DROP CONSTRAINT uploads_status_check;
ALTER TABLE school_api.uploads ADD CONSTRAINT uploads_status_check
    CHECK (status IN ('pending', 'confirmed', 'expired'));

CREATE INDEX uploads_pending_expiry ON school_api.uploads (expires_at) WHERE status = 'pending';
