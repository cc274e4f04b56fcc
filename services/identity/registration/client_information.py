"""RFC 7591 section 3.2.1: the client information response, and where a client manages itself.

The registered metadata in seed 001's order, never a secret but the one shown at
registration; `registration_client_uri` is the RFC 7592 endpoint of that client.
"""

from __future__ import annotations

from typing import Any

from libs.common import scopes as catalogue
from services.identity import clients, store
from services.identity.registration.metadata import TEXT_MEMBERS, URI_MEMBERS


def registration_client_uri(issuer_url: str, client_id: str) -> str:
    return f"{issuer_url}/v1/oauth/register/{client_id}"


def client_information(client: store.Client, issuer_url: str) -> dict[str, Any]:
    """The client's registered metadata (RFC 7591 3.2.1) in seed 001's order, no secrets."""
    document: dict[str, Any] = {
        "client_id": client.id,
        "client_name": client.name,
        "redirect_uris": list(client.redirect_uris),
        "grant_types": list(client.grant_types),
        "response_types": list(client.response_types),
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "scope": catalogue.format_scopes(client.scopes),
        "client_id_issued_at": int(client.created_at.timestamp()),
    }
    for member in (*URI_MEMBERS, "contacts", *TEXT_MEMBERS):
        if member in client.metadata:
            document[member] = client.metadata[member]
    document["registration_client_uri"] = registration_client_uri(issuer_url, client.id)
    return document


def registration_response(made: clients.NewClient, issuer_url: str) -> dict[str, Any]:
    document = client_information(made.client, issuer_url)
    if made.client_secret is not None:
        document["client_secret"] = made.client_secret
        document["client_secret_expires_at"] = 0  # RFC 7591 3.2.1: does not expire
    document["registration_access_token"] = made.registration_access_token
    return document
