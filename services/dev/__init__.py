"""Development: what `loopwise-connect dev` (`make dev`) runs, the whole system on one machine.

`stack` starts every part as its own process and stops them on Ctrl-C; `localstores` finds
PostgreSQL and Redis or starts local ones (`postgres`, `valkey`, sharing `probes`);
`database` migrates the development database, checks its secrets and seeds it; `seed` makes
the demo schools and their admins (the school data itself: `services.school_api.seed`).
"""
