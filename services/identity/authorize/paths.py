"""Where the authorization endpoint and its flow's pages answer."""

from __future__ import annotations

AUTHORIZE_PATH = "/v1/oauth/authorize"
# The seed quickstart's path.
AUTHORIZE_ALIAS = "/oauth/authorize"
RESUME_PATH = "/v1/oauth/authorize/resume"
LOGIN_PATH = "/v1/oauth/login"
SELECT_SCHOOL_PATH = "/v1/oauth/select-school"
CONSENT_PATH = "/v1/oauth/consent"
