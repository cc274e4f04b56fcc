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


def mcp_only(client: store.Client | None) -> bool:
    """A platform client that registered itself (RFC 7591): anyone can make one, on the
    always-open platform origin, so it gets what it exists for (MCP) and not the school's
    whole API. Operator-made platform clients (CLI, admin) are exempt."""
    return client is not None and client.is_platform and client.created_via == "registration"


def allowed(
    settings: Settings, school: store.School, issuer: str, client: store.Client | None = None
) -> frozenset[str]:
    """The school's API, and the MCP endpoint for the platform's tokens only: the MCP
    resource's metadata names the platform as its one authorization server (RFC 9728), so a
    school issuer minting for it would mint what the resource refuses."""
    if mcp_only(client):
        return frozenset({mcp_resource(settings)})
    if issuer == settings.urls.platform_url:
        return frozenset({api_resource(settings, school), mcp_resource(settings)})
    return frozenset({api_resource(settings, school)})


def default_resource(settings: Settings, client: store.Client | None) -> str | None:
    """What a client that named no `resource` gets: the MCP endpoint for an MCP-only client
    (an MCP client that omits RFC 8707 must still get a token the MCP server accepts), else
    None, the school's API."""
    return mcp_resource(settings) if mcp_only(client) else None


def audience(
    settings: Settings,
    school: store.School,
    resource: str | None,
    *,
    issuer: str,
    client: store.Client | None = None,
) -> str | None:
    """The `aud` for a token of `issuer` (for `client`, when known); None when `resource` is
    not one it may name."""
    resource = resource or default_resource(settings, client)
    if not resource:
        return api_resource(settings, school)
    normalised = resource.rstrip("/")
    return normalised if normalised in allowed(settings, school, issuer, client) else None
