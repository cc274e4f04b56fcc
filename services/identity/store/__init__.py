"""Every SQL statement identity runs, as plain async functions over asyncpg.

Handlers and domain modules never write SQL; they call these. Rows come back as dataclasses so
the rest of the service reads attributes, not string keys. The core model has a module per
aggregate, each re-exported here so callers write `store.client_by_id(...)`:
- schools.py: schools; users.py: users and their memberships;
- clients.py: OAuth clients and the per-process cache client authentication reads;
- signing_keys.py: each issuer's signing keys; grants.py: grants, the standing grant, status.
The flow's tables have a module each beside them, imported by name (`store.codes`,
`store.refresh_tokens`, `store.authorize`, `store.sessions`, ...), and so do the pages'
queries (`store.account`, `store.admin`, `store.registration`, `store.audit`).
"""

from __future__ import annotations

from services.identity.store.clients import (
    CLIENT_CACHE_TTL,
    Client,
    _client,
    cached_client_by_id,
    client_by_id,
    client_changes_followed,
    client_changes_unfollowed,
    delete_client,
    forget_client,
    insert_client,
    list_clients,
    possible_client_id,
    rehash_client_secret,
    update_client,
)
from services.identity.store.grants import (
    Grant,
    active_grants_of,
    forget_self_registered_consents,
    grant_by_id,
    insert_grant,
    live_self_registered_grants,
    mark_grants_revoked,
    schools_of_grants,
    touch_grant,
)
from services.identity.store.schools import (
    School,
    insert_school,
    list_schools,
    school_by_id,
    school_by_subdomain,
    set_open_registration,
)
from services.identity.store.signing_keys import (
    SigningKey,
    insert_key,
    issuers_due_for_rotation,
    key_by_kid,
    keys_of_issuer,
    lock_issuer_keys,
    promote_key,
    reseal_private_key,
    retire_key,
    sealed_private_keys,
)
from services.identity.store.users import (
    Membership,
    User,
    insert_user,
    list_users,
    membership_role,
    memberships_of,
    update_password_hash,
    upsert_membership,
    user_by_email,
    user_by_id,
)

__all__ = [
    "CLIENT_CACHE_TTL",
    "Client",
    "Grant",
    "Membership",
    "School",
    "SigningKey",
    "User",
    "_client",
    "active_grants_of",
    "cached_client_by_id",
    "client_by_id",
    "client_changes_followed",
    "client_changes_unfollowed",
    "delete_client",
    "forget_client",
    "forget_self_registered_consents",
    "grant_by_id",
    "insert_client",
    "insert_grant",
    "insert_key",
    "insert_school",
    "insert_user",
    "issuers_due_for_rotation",
    "key_by_kid",
    "keys_of_issuer",
    "list_clients",
    "list_schools",
    "list_users",
    "live_self_registered_grants",
    "lock_issuer_keys",
    "mark_grants_revoked",
    "membership_role",
    "memberships_of",
    "possible_client_id",
    "promote_key",
    "rehash_client_secret",
    "reseal_private_key",
    "retire_key",
    "school_by_id",
    "school_by_subdomain",
    "schools_of_grants",
    "sealed_private_keys",
    "set_open_registration",
    "touch_grant",
    "update_client",
    "update_password_hash",
    "upsert_membership",
    "user_by_email",
    "user_by_id",
]
