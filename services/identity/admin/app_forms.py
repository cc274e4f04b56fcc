"""What the application forms hold, read and checked as dynamic registration checks it.

Redirect URIs https or loopback http without fragments or wildcards (clients.py's rules,
registration's limits), allowed origins, and the scopes a school's app may be offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from libs.common import scopes as catalogue
from libs.common.errors import InvalidClientMetadata, InvalidRedirectUri
from services.identity import clients, redirect_uris, registration, store


def _lines(value: str) -> list[str]:
    return list(dict.fromkeys(line.strip() for line in value.splitlines() if line.strip()))


def redirect_uris_of(raw: str) -> list[str]:
    """Redirect URIs, one a line, checked as dynamic registration checks them."""
    uris = _lines(raw)
    if len(uris) > registration.MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(f"at most {registration.MAX_REDIRECT_URIS} redirect URIs")
    if any(len(u) > registration.MAX_URI_LENGTH for u in uris):
        raise InvalidRedirectUri("a redirect URI is too long")
    return [redirect_uris.validate_redirect_uri(u) for u in uris]


def origins_of(raw: str) -> list[str]:
    origins = _lines(raw)
    if len(origins) > registration.MAX_REDIRECT_URIS:
        raise InvalidClientMetadata(f"at most {registration.MAX_REDIRECT_URIS} origins")
    return list(dict.fromkeys(clients.validate_origin(o) for o in origins))


def offered_scopes(school: store.School) -> list[catalogue.Scope]:
    """What an app of this school may be registered for: never admin scopes, only what the
    school allows."""
    allowed = school.allowed_scopes
    return [
        catalogue.CATALOGUE[s]
        for s in catalogue.PUBLIC_SCOPES
        if allowed is None or s in allowed or s in catalogue.IDENTITY_SCOPES
    ]


@dataclass(frozen=True, slots=True)
class AppForm:
    """What the create form holds, echoed back when it has to be corrected."""

    name: str = ""
    redirect_uris: str = ""
    origins: str = ""
    scopes: tuple[str, ...] = ("openid",)
    public: bool = False
    machine: bool = False

    @classmethod
    def read(cls, form: MultiMapping[Any]) -> AppForm:
        return cls(
            name=str(form.get("name", ""))[:200],
            redirect_uris=str(form.get("redirect_uris", ""))[:50_000],
            origins=str(form.get("origins", ""))[:50_000],
            scopes=tuple(str(s) for s in form.getall("scope", []))[:100],
            public=form.get("client_type") == "public",
            machine=form.get("client_credentials") == "yes",
        )
