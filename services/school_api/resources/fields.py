"""The fields many resources share: timestamps, title, description, price, status, references."""

from __future__ import annotations

from services.school_api.resources.model import MAX_CENTS, Field


def created() -> Field:
    return Field("created_at", "timestamp", "When the row was created", writable=False)


def updated() -> Field:
    return Field("updated_at", "timestamp", "When the row last changed", writable=False)


def title(required: bool = True) -> Field:
    return Field("title", "string", "Title", required=required, min_length=1, max_length=200)


def description() -> Field:
    return Field("description", "text", "Description", max_length=20_000)


def price() -> tuple[Field, Field]:
    return (
        Field(
            "price_cents",
            "integer",
            "Price in the currency's minor unit",
            minimum=0,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
    )


def status(default_first: tuple[str, ...], description: str = "Status") -> Field:
    return Field(
        "status", "enum", f"{description} (default {default_first[0]})", choices=default_first
    )


def ref(
    name: str,
    resource: str,
    description: str,
    *,
    required: bool = False,
    nullable: bool = False,
    writable: bool = True,
    updatable: bool = True,
    filterable: bool = False,
    unique: bool = False,
) -> Field:
    return Field(
        name,
        "reference",
        description,
        references=resource,
        required=required,
        nullable=nullable,
        writable=writable,
        updatable=updatable,
        filterable=filterable,
        unique=unique,
    )
