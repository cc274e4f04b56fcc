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


def allowed(settings: Settings, school: store.School, issuer: str) -> frozenset[str]:
    """The school's API, and the MCP endpoint for the platform's tokens only: the MCP
    resource's metadata names the platform as its one authorization server (RFC 9728), so a
    school issuer minting for it would mint what the resource refuses."""
    if issuer == settings.urls.platform_url:
        return frozenset({api_resource(settings, school), mcp_resource(settings)})
    return frozenset({api_resource(settings, school)})


def audience(
    settings: Settings, school: store.School, resource: str | None, *, issuer: str
) -> str | None:
    """The `aud` for a token of `issuer`; None when `resource` is not one it may name."""
    if not resource:
        return api_resource(settings, school)
    normalised = resource.rstrip("/")
    return normalised if normalised in allowed(settings, school, issuer) else None
