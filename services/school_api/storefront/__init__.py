"""The school's storefront side of the reference service: what members and buyers do on the
school's own site, outside the partner API, and the events it emits.

A checkout places and pays an order (and redeems a coupon, and enrolls the buyer); people
sign up, progress through courses and leave them, are removed; they comment on posts and
review courses, register for the school's events and cancel; subscriptions renew and are
cancelled. Each action writes its rows and its events to the outbox in one transaction
(`store`), so an action that commits always has its events and one that fails has none.

`actions` is the table of actions (`loopwise-connect storefront <action> --school S`, one
subcommand each); `demo` the gentle stream of activity `make dev` runs (CONNECT_DEMO_ACTIVITY).
"""
