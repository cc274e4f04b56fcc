-- Every audit record is keyed by its own id, made where the record is created (the gateway's
-- `rid`, identity's `i:<uuid>`), no longer by its connect:audit entry id: a Redis restarted
-- empty, or whose clock is behind the old one's, hands out entry ids it handed out before, and
-- `ON CONFLICT DO NOTHING` silently discarded the records that came under them. Rows stored
-- before keep their keys (entry ids, unique among themselves).
ALTER TABLE audit_log RENAME COLUMN stream_id TO record_id;
ALTER TABLE audit_log RENAME CONSTRAINT audit_log_stream_id_key TO audit_log_record_id_key;
UPDATE audit_log SET record_id = 'legacy:' || id WHERE record_id IS NULL;
ALTER TABLE audit_log ALTER COLUMN record_id SET NOT NULL;
COMMENT ON COLUMN audit_log.record_id IS
    'the record''s own id: r:<rid> (gateway), i:<uuid> (identity), h:<sha256> (a record that came without one)';
