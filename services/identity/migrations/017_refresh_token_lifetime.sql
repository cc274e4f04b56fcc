-- Refresh token lifetimes (REFRESH_TOKEN_IDLE_TTL, REFRESH_TOKEN_MAX_TTL): `expires_at` is the
-- idle limit, started again at each rotation and never past `family_expires_at`, the absolute
-- end of the chain of rotations one authorization began (NULL: none). With no idle limit
-- `expires_at` is 'infinity'.
ALTER TABLE refresh_tokens ADD COLUMN family_expires_at timestamptz;
