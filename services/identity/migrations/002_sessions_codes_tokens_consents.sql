-- The authorization code flow: browser sessions, remembered consent, codes, refresh tokens,
-- and the audit trail.

CREATE TABLE sessions (
    id_hash             bytea       PRIMARY KEY,   -- SHA-256 of the cookie value
    user_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_secret         bytea       NOT NULL,
    authenticated_at    timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    user_agent          text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expiry ON sessions (expires_at);

-- What a user has agreed to, per client and school: asked again only for new scopes.
CREATE TABLE consents (
    user_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id           text        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    school_id           bigint      NOT NULL REFERENCES schools (id) ON DELETE CASCADE,
    scopes              text[]      NOT NULL,
    granted_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, client_id, school_id)
);

CREATE TABLE authorization_codes (
    code_hash           bytea       PRIMARY KEY,   -- SHA-256 of the code
    grant_id            uuid        NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    client_id           text        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    school_id           bigint      NOT NULL REFERENCES schools (id) ON DELETE CASCADE,
    user_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    redirect_uri        text        NOT NULL,
    scopes              text[]      NOT NULL,
    code_challenge      text        NOT NULL,
    nonce               text,
    resource            text,
    auth_time           timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    redeemed_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX authorization_codes_expiry ON authorization_codes (expires_at);

-- Refresh tokens form one chain per grant: each use rotates to a successor.
CREATE TABLE refresh_tokens (
    token_hash          bytea       PRIMARY KEY,   -- SHA-256 of the opaque token
    grant_id            uuid        NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    client_id           text        NOT NULL,
    scopes              text[]      NOT NULL,
    resource            text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    rotated_at          timestamptz,
    -- The successor handed out on rotation. The successor's value is derived from this
    -- token under SECRET_PEPPER, so a concurrent retry within the grace window receives the
    -- very same refresh token without any token being stored in a readable form.
    successor_hash      bytea
);
CREATE INDEX refresh_tokens_grant ON refresh_tokens (grant_id);

-- Who accessed what, when, with whose consent: fed from connect:audit.
CREATE TABLE audit_log (
    id                  bigint      PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    stream_id           text        UNIQUE,        -- the connect:audit entry, for idempotence
    occurred_at         timestamptz NOT NULL,
    school_id           bigint,
    client_id           text,
    subject             text,
    grant_id            uuid,
    action              text        NOT NULL,      -- api.call, token.issued, grant.revoked...
    method              text,
    path                text,
    status              integer,
    scope               text,
    ip                  inet,
    detail              jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_school_time ON audit_log (school_id, occurred_at DESC);
CREATE INDEX audit_log_subject_time ON audit_log (subject, occurred_at DESC);
