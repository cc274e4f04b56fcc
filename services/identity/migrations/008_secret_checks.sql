-- A check value of each secret identity is started with (a keyed hash under the secret, never
-- the secret), recorded by the first process to use the database. A process started later
-- with another KEY_ENCRYPTION_KEY or SECRET_PEPPER computes a different value and refuses to
-- start, instead of failing every signature (keys that will not open) or every client secret.
CREATE TABLE secret_checks (
    variable    text        PRIMARY KEY CHECK (variable IN ('KEY_ENCRYPTION_KEY', 'SECRET_PEPPER')),
    check_value bytea       NOT NULL CHECK (length(check_value) = 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
