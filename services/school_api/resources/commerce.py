"""What the school sells and what was bought: orders, membership plans and subscriptions to
them, coupons, digital downloads.

Scopes `orders:read`, `membership_plans:*`, `subscriptions:*`, `coupons:*`, `digital_products:*`.
"""

from __future__ import annotations

from services.school_api.resources.fields import (
    created,
    description,
    price,
    ref,
    status,
    title,
    updated,
)
from services.school_api.resources.model import MAX_CENTS, MAX_INT, Field, Resource, Transition

ORDERS = Resource(
    name="orders",
    singular="order",
    table="orders",
    summary="Orders and payments",
    fields=(
        ref("member_id", "members", "The buyer", filterable=True),
        ref("course_id", "courses", "The course bought, if a course", nullable=True),
        Field(
            "amount_cents",
            "integer",
            "Amount in the currency's minor unit",
            minimum=0,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
        Field(
            "status",
            "enum",
            "Payment status",
            choices=("pending", "paid", "refunded", "failed"),
            filterable=True,
        ),
        created(),
        updated(),
    ),
    read_scopes=("orders:read",),
    operations=frozenset({"list", "get"}),
)


MEMBERSHIP_PLANS = Resource(
    name="membership-plans",
    singular="membership_plan",
    table="membership_plans",
    summary="Membership plans members subscribe to",
    fields=(
        Field("name", "string", "Plan name", required=True, min_length=1, max_length=200),
        description(),
        *price(),
        Field("billing_interval", "enum", "How often it bills", choices=("month", "year")),
        status(("active", "archived")),
        created(),
        updated(),
    ),
    read_scopes=("membership_plans:read",),
    write_scopes=("membership_plans:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)


SUBSCRIPTIONS = Resource(
    name="subscriptions",
    singular="subscription",
    table="subscriptions",
    summary="Members' subscriptions to membership plans",
    fields=(
        ref(
            "member_id",
            "members",
            "The subscriber",
            required=True,
            updatable=False,
            filterable=True,
        ),
        ref("membership_plan_id", "membership-plans", "The plan", required=True),
        status(("active", "past_due", "cancelled")),
        Field("started_at", "timestamp", "When it began", writable=False),
        Field("current_period_end", "timestamp", "End of the paid period", nullable=True),
        Field("cancelled_at", "timestamp", "When it was cancelled", nullable=True),
        created(),
        updated(),
    ),
    read_scopes=("subscriptions:read",),
    write_scopes=("subscriptions:write",),
    operations=frozenset({"list", "get", "create", "update"}),
    transitions=(Transition("status", "cancelled", "cancelled"),),
)


COUPONS = Resource(
    name="coupons",
    singular="coupon",
    table="coupons",
    summary="Discount coupons",
    fields=(
        Field(
            "code",
            "string",
            "What buyers type: A-Z, 0-9, - and _, unique in the school",
            required=True,
            fmt="coupon_code",
            min_length=3,
            max_length=32,
            unique=True,
        ),
        description(),
        Field("discount_percent", "integer", "Percent off", nullable=True, minimum=1, maximum=100),
        Field(
            "amount_off_cents",
            "integer",
            "Fixed amount off",
            nullable=True,
            minimum=1,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
        Field(
            "max_redemptions",
            "integer",
            "Use limit; null for unlimited",
            nullable=True,
            minimum=1,
            maximum=MAX_INT,
        ),
        Field("redeemed_count", "integer", "Times used", writable=False),
        Field("expires_at", "timestamp", "Expiry", nullable=True),
        Field("active", "boolean", "Whether it can be used"),
        created(),
        updated(),
    ),
    read_scopes=("coupons:read",),
    write_scopes=("coupons:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)


DIGITAL_DOWNLOADS = Resource(
    name="digital-downloads",
    singular="digital_download",
    table="digital_downloads",
    summary="Digital products: e-books, templates, recordings",
    fields=(
        title(),
        description(),
        *price(),
        Field("file_url", "string", "Where the file is", nullable=True, fmt="url", max_length=2000),
        status(("draft", "published")),
        created(),
        updated(),
    ),
    read_scopes=("digital_products:read",),
    write_scopes=("digital_products:write",),
    operations=frozenset({"list", "get", "create", "update"}),
    transitions=(Transition("status", "published", "published"),),
)
