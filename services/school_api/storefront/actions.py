"""The storefront's actions as the CLI offers them: `loopwise-connect storefront <action>
--school S ...`, one subcommand per action, its options and what it emits.

Each action is a plain async function of the pool, the school and its options (the argparse
namespace's values by name), over `store`. Options left out choose a fitting row at random.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from services.school_api.storefront import store
from services.school_api.storefront.store import Outcome, StorefrontError

__all__ = ["ACTIONS", "Action", "Option", "Outcome", "StorefrontError", "run"]


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # the flag without dashes, and the function's keyword (dashes as underscores)
    kind: Literal["int", "str", "flag"]
    help: str
    default: Any = None


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    help: str
    options: tuple[Option, ...]
    run: Callable[..., Awaitable[Outcome]]


_MEMBER = Option("member", "int", "the member's id (default: an active member at random)")
_COURSE = Option("course", "int", "the course's id (default: a published course at random)")
_FIRST_NAMES = ("Ana", "Ben", "Chloé", "Dev", "Emi", "Farah", "Gus", "Hana", "Ivo", "Jin")
_LAST_NAMES = ("Souza", "Carter", "Martin", "Patel", "Tanaka", "Haddad", "Berg", "Okafor")


async def _signup(
    pool: asyncpg.Pool, school_id: int, name: str | None, email: str | None
) -> Outcome:
    if name is None:
        name = f"{secrets.choice(_FIRST_NAMES)} {secrets.choice(_LAST_NAMES)}"
    if email is None:
        local = name.lower().replace(" ", ".").encode("ascii", "ignore").decode()
        email = f"{local}.{secrets.token_hex(3)}@example.com"
    return await store.signup(pool, school_id, name=name, email=email)


async def _checkout(
    pool: asyncpg.Pool,
    school_id: int,
    member: int | None,
    course: int | None,
    coupon: str | None,
    paid: bool,
    declined: bool,
) -> Outcome:
    return await store.checkout(
        pool,
        school_id,
        member_id=member,
        course_id=course,
        coupon=coupon,
        paid=paid,
        declined=declined,
    )


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            "checkout",
            "a member buys a course: order.created; with --paid order.paid, enrollment.created"
            " (and coupon.redeemed with --coupon); with --declined order.failed",
            (
                _MEMBER,
                _COURSE,
                Option("coupon", "str", "a coupon code to redeem (when paid)"),
                Option("paid", "flag", "the payment goes through"),
                Option("declined", "flag", "the payment is declined"),
            ),
            _checkout,
        ),
        Action(
            "refund",
            "a paid order is refunded: order.refunded",
            (Option("order", "int", "the order's id (default: a paid order at random)"),),
            lambda pool, school_id, order: store.refund(pool, school_id, order_id=order),
        ),
        Action(
            "signup",
            "someone signs up on the school's site: member.created",
            (
                Option("name", "str", "their name (default: made up)"),
                Option("email", "str", "their email (default: made up)"),
            ),
            _signup,
        ),
        Action(
            "remove-member",
            "a member without orders or subscriptions leaves the school: member.deleted",
            (Option("member", "int", "the member's id (default: one at random)"),),
            lambda pool, school_id, member: store.remove_member(pool, school_id, member_id=member),
        ),
        Action(
            "progress",
            "a member gets further through a course: enrollment.updated, member.progressed;"
            " at 100 percent enrollment.completed",
            (
                Option("member", "int", "the member's id (default: any active enrollment)"),
                Option("course", "int", "the course's id"),
                Option("percent", "int", "the progress reached (default: 25 more)"),
            ),
            lambda pool, school_id, member, course, percent: store.progress(
                pool, school_id, member_id=member, course_id=course, percent=percent
            ),
        ),
        Action(
            "unenroll",
            "a member leaves a course: enrollment.deleted, member.unenrolled",
            (
                Option("member", "int", "the member's id (default: any enrollment)"),
                Option("course", "int", "the course's id"),
            ),
            lambda pool, school_id, member, course: store.unenroll(
                pool, school_id, member_id=member, course_id=course
            ),
        ),
        Action(
            "comment",
            "a member comments on a published post: comment.created",
            (
                Option("post", "int", "the post's id (default: a published post at random)"),
                _MEMBER,
                Option("body", "str", "what they say", "Thank you, this helped!"),
            ),
            lambda pool, school_id, post, member, body: store.comment(
                pool, school_id, post_id=post, member_id=member, body=body
            ),
        ),
        Action(
            "hide-comment",
            "moderation hides a comment: comment.updated",
            (Option("comment", "int", "the comment's id (default: a visible one at random)"),),
            lambda pool, school_id, comment: store.hide_comment(
                pool, school_id, comment_id=comment
            ),
        ),
        Action(
            "delete-comment",
            "its author removes a comment: comment.deleted",
            (Option("comment", "int", "the comment's id (default: one at random)"),),
            lambda pool, school_id, comment: store.delete_comment(
                pool, school_id, comment_id=comment
            ),
        ),
        Action(
            "review",
            "a member reviews a published course: review.created",
            (
                _COURSE,
                _MEMBER,
                Option("rating", "int", "stars, 1 to 5", 5),
                Option("body", "str", "what they say", "Clear and friendly, recommended."),
            ),
            lambda pool, school_id, course, member, rating, body: store.review(
                pool, school_id, course_id=course, member_id=member, rating=rating, body=body
            ),
        ),
        Action(
            "edit-review",
            "its author changes a review: review.updated",
            (
                Option("review", "int", "the review's id (default: one at random)"),
                Option("rating", "int", "stars, 1 to 5", 4),
                Option("body", "str", "new words (default: unchanged)"),
            ),
            lambda pool, school_id, review, rating, body: store.edit_review(
                pool, school_id, review_id=review, rating=rating, body=body
            ),
        ),
        Action(
            "delete-review",
            "its author removes a review: review.deleted",
            (Option("review", "int", "the review's id (default: one at random)"),),
            lambda pool, school_id, review: store.delete_review(pool, school_id, review_id=review),
        ),
        Action(
            "register",
            "a member registers for an upcoming school event: event.attendee_registered",
            (
                Option("event", "int", "the event's id (default: one with a seat left)"),
                _MEMBER,
            ),
            lambda pool, school_id, event, member: store.register(
                pool, school_id, event_id=event, member_id=member
            ),
        ),
        Action(
            "cancel-registration",
            "a member cancels their registration: event.attendee_cancelled",
            (
                Option("event", "int", "the event's id (default: any registration)"),
                Option("member", "int", "the member's id"),
            ),
            lambda pool, school_id, event, member: store.cancel_registration(
                pool, school_id, event_id=event, member_id=member
            ),
        ),
        Action(
            "renew",
            "a subscription is paid for another period: subscription.renewed",
            (Option("subscription", "int", "the subscription's id (default: an active one)"),),
            lambda pool, school_id, subscription: store.renew(
                pool, school_id, subscription_id=subscription
            ),
        ),
        Action(
            "cancel-subscription",
            "a member cancels a subscription: subscription.cancelled",
            (Option("subscription", "int", "the subscription's id (default: a live one)"),),
            lambda pool, school_id, subscription: store.cancel_subscription(
                pool, school_id, subscription_id=subscription
            ),
        ),
    )
}


async def run(
    pool: asyncpg.Pool, name: str, school_id: int, options: Mapping[str, Any] | None = None
) -> Outcome:
    """Run action `name` in the school; options by name (dashes or underscores), the rest
    at their defaults."""
    action = ACTIONS[name]
    given = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    values = {
        o.name: given.get(o.name, False if o.kind == "flag" else o.default) for o in action.options
    }
    unknown = set(given) - set(values)
    if unknown:
        raise StorefrontError(f"{name} takes no {', '.join(sorted(unknown))}")
    return await action.run(pool, school_id, **values)
