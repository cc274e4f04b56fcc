-- audit_log partitioned by month of occurred_at (UTC), so retention drops a month whole
-- (DROP TABLE: no DELETE of millions of rows, no bloat, no vacuum debt) and the pages' time
-- filters read only the months they ask for. Existing rows are kept, with their ids.
--
-- A unique constraint of a partitioned table must include the partition key, so a record's
-- uniqueness is (record_id, occurred_at), no longer record_id alone. The same thing for every
-- record we store: a record's occurred_at is set once, where it is made (the gateway's and
-- identity's time.time() in the record itself), and travels with it on every resend, so a
-- record sent again has the same pair and `ON CONFLICT (record_id, occurred_at)` still skips
-- it. Only a record without a usable occurred_at is stamped when stored (services/identity/
-- audit.py, store/audit.py's coalesce(..., now())); no producer of ours makes one, and if one
-- did, a resend of it could be stored twice: a duplicate row, never a lost record.
--
-- Rows whose month has no partition (clocks far off; months before the oldest partition made
-- here) go to audit_log_default rather than failing the consumer's batch; the sweep moves
-- them into their month's partition when it makes it, and deletes those older than the
-- retention (services/identity/audit_retention.py).
ALTER TABLE audit_log RENAME TO audit_log_unpartitioned;
ALTER TABLE audit_log_unpartitioned RENAME CONSTRAINT audit_log_pkey TO audit_log_unpartitioned_pkey;
ALTER TABLE audit_log_unpartitioned RENAME CONSTRAINT audit_log_record_id_key
    TO audit_log_unpartitioned_record_id_key;
ALTER INDEX audit_log_school_time RENAME TO audit_log_unpartitioned_school_time;
ALTER INDEX audit_log_subject_time RENAME TO audit_log_unpartitioned_subject_time;

CREATE TABLE audit_log (
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    record_id           text        NOT NULL,
    occurred_at         timestamptz NOT NULL,
    school_id           bigint,
    client_id           text,
    subject             text,
    grant_id            uuid,
    action              text        NOT NULL,
    method              text,
    path                text,
    status              integer,
    scope               text,
    ip                  inet,
    detail              jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, occurred_at),
    CONSTRAINT audit_log_record_id_key UNIQUE (record_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX audit_log_school_time ON audit_log (school_id, occurred_at DESC);
CREATE INDEX audit_log_subject_time ON audit_log (subject, occurred_at DESC);
-- For the sweep's range scans by time alone (addresses to truncate, old rows of the default
-- partition): a BRIN index costs next to nothing per insert of rows arriving in time order.
CREATE INDEX audit_log_time ON audit_log USING brin (occurred_at);
COMMENT ON COLUMN audit_log.record_id IS
    'the record''s own id: r:<rid> (gateway), i:<uuid> (identity), h:<sha256> (a record that came without one)';
COMMENT ON COLUMN audit_log.ip IS
    'the client''s address; cut to its /24 (IPv4) or /48 (IPv6) network after AUDIT_IP_RETENTION_DAYS';

CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;

-- A partition per month that has rows (of the last five years: older ones go to the default
-- partition, where retention deletes them), and for this month and the next three, so the
-- first sweep finds them made.
-- Months are computed as UTC wall-clock timestamps: a month added to a timestamptz would be
-- added in the session's time zone, and across a daylight-saving change miss midnight UTC.
DO $$
DECLARE
    month timestamp;
BEGIN
    FOR month IN
        SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC')
        FROM audit_log_unpartitioned
        WHERE occurred_at >= now() - interval '5 years' AND occurred_at < now() + interval '4 months'
        UNION
        SELECT date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n)
        FROM generate_series(0, 3) AS n
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
            'audit_log_y' || to_char(month, 'YYYY"m"MM'),
            month AT TIME ZONE 'UTC',
            (month + interval '1 month') AT TIME ZONE 'UTC'
        );
    END LOOP;
END
$$;

INSERT INTO audit_log (id, record_id, occurred_at, school_id, client_id, subject, grant_id,
    action, method, path, status, scope, ip, detail)
OVERRIDING SYSTEM VALUE
SELECT id, record_id, occurred_at, school_id, client_id, subject, grant_id,
    action, method, path, status, scope, ip, detail
FROM audit_log_unpartitioned;
SELECT setval(pg_get_serial_sequence('audit_log', 'id'), coalesce(max(id), 0) + 1, false)
FROM audit_log;
DROP TABLE audit_log_unpartitioned;

-- How far back client addresses are already cut: the sweep truncates from here to the
-- AUDIT_IP_RETENTION_DAYS cutoff and moves it on, so it never reads the same rows twice.
CREATE TABLE audit_retention (
    only_row            boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    ips_truncated_before timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO audit_retention DEFAULT VALUES;
