"""What a catalogue entry is: a `Resource` and its `Field`s, and the limits values keep to.

An entry says its URL segment, table, fields (with their types and limits), the scopes that
read and write it, which operations exist, and the names of the events its changes publish.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# `number` and `object` only appear in computed answers (analytics), never in input.
FieldKind = Literal[
    "string", "text", "integer", "number", "boolean", "timestamp", "enum", "reference", "object"
]
Operation = Literal["list", "get", "create", "update", "delete"]
ResourceKind = Literal["collection", "singleton", "computed", "upload"]
Change = Literal["created", "updated", "deleted"]

# Formats a string field may demand; validation.py holds their checks.
Format = Literal["email", "url", "color", "currency", "timezone", "locale", "coupon_code"]

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
# Money is whole cents in a bigint; a trillion dollars is enough for any school.
MAX_CENTS = 10**14

_IDENTIFIER = re.compile(r"^[a-z_]+$")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: FieldKind
    description: str = ""
    required: bool = False  # must be given on create
    nullable: bool = False  # null is a value clients may send and read
    writable: bool = True  # False: the service manages it (timestamps, counters)
    updatable: bool = True  # False: set on create only
    min_length: int = 0
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    fmt: Format | None = None
    references: str | None = None  # a resource name: the id must name a row of the same school
    filterable: bool = False  # `?name=value` on the list
    unique: bool = False  # unique per school; a clash answers 409
    # Narrower than the resource's write scopes (settings: a theme field needs appearance:write).
    write_scopes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Parent:
    """A nested collection: `/api/v1/{resource}/{id}/{name}`, rows tied by `field`."""

    resource: str
    field: str


@dataclass(frozen=True, slots=True)
class Transition:
    field: str
    value: str
    action: str


# eq=False: resources are singletons of the catalogue, compared and hashed by identity, which
# keeps the statement caches keyed by them cheap on every request.
@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    name: str  # the URL segment: "membership-plans"
    singular: str  # the event prefix: "membership_plan"
    table: str
    summary: str
    fields: tuple[Field, ...]
    read_scopes: tuple[str, ...]
    write_scopes: tuple[str, ...] = ()
    operations: frozenset[Operation] = frozenset({"list", "get"})
    kind: ResourceKind = "collection"
    parent: Parent | None = None
    # Event names that differ from `{singular}.{created|updated|deleted}`.
    event_overrides: tuple[tuple[str, str], ...] = ()
    # An update that moves `field` to `value` from anything else also publishes
    # `{singular}.{action}` after `.updated` (`("status", "published", "published")`).
    transitions: tuple[Transition, ...] = ()
    # Derived in __post_init__: the fields by name, for validation's lookups per request.
    field_map: dict[str, Field] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "field_map", {f.name: f for f in self.fields})
        # Table and column names are interpolated into SQL; they come from this file only,
        # and this guard keeps it that way.
        for identifier in (self.table, *(f.name for f in self.fields)):
            if not _IDENTIFIER.match(identifier):
                raise ValueError(f"{identifier!r} is not a plain SQL identifier")

    @property
    def columns(self) -> tuple[str, ...]:
        """What a row shows, in order: `id`, `school_id`, then the fields."""
        return ("id", "school_id", *(f.name for f in self.fields))

    @property
    def has_updated_at(self) -> bool:
        return any(f.name == "updated_at" for f in self.fields)

    @property
    def path(self) -> str:
        if self.parent is not None:
            return f"/api/v1/{self.parent.resource}/{{id}}/{self.name}"
        return f"/api/v1/{self.name}"

    def event_type(self, change: Change) -> str:
        return dict(self.event_overrides).get(change, f"{self.singular}.{change}")

    def event_types(self) -> list[str]:
        changes: list[Change] = []
        if "create" in self.operations:
            changes.append("created")
        if "update" in self.operations:
            changes.append("updated")
        if "delete" in self.operations:
            changes.append("deleted")
        return [self.event_type(c) for c in changes] + [
            f"{self.singular}.{t.action}" for t in self.transitions
        ]
