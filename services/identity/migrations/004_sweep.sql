-- The periodic sweep (services/identity/sweep.py) finds the refresh tokens of revoked grants
-- through this; live grants, the vast majority, stay out of the index.
CREATE INDEX grants_revoked ON grants (revoked_at) WHERE revoked_at IS NOT NULL;
