"""RFC 8707 resource indicators: which audiences a token of an issuer may be minted for."""

from __future__ import annotations

from libs.common.config import Settings
from services.identity import store


def mcp_resource(settings: Settings) -> str:
    """The MCP endpoint, a platform-level protected resource (RFC 9728)."""
    return f"{settings.urls.platform_url}/mcp"


def api_resource(settings: Settings, school: store.School) -> str:
    """A school's API origin: the audience of a token that named no resource."""
    return settings.urls.school_origin(school.subdomain)


def allowed(settings: Settings, school: store.School) -> frozenset[str]:
    return frozenset({api_resource(settings, school), mcp_resource(settings)})


def audience(settings: Settings, school: store.School, resource: str | None) -> str | None:
    """The `aud` for a token; None when `resource` is not one this school's tokens may name."""
    if not resource:
        return api_resource(settings, school)
    normalised = resource.rstrip("/")
    return normalised if normalised in allowed(settings, school) else None
