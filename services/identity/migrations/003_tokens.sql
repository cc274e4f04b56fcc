-- The token endpoint's additions.

-- client_credentials uses one standing grant per (client, school) with no user, so its tokens
-- carry a grant id and revoking that grant ends them. At most one live standing grant each:
-- concurrent first requests race on this index instead of creating two.
CREATE UNIQUE INDEX grants_one_standing
    ON grants (client_id, school_id) WHERE user_id IS NULL AND revoked_at IS NULL;

-- When the user signed in for the grant a refresh token belongs to, so access tokens minted
-- by a refresh carry the same `auth_time` as the first one (RFC 9068 2.2.1).
ALTER TABLE refresh_tokens ADD COLUMN auth_time timestamptz;

-- Expired refresh tokens are swept by age.
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);
