"""What every service shares: `config` (the typed Settings), `db` (the PostgreSQL pool and
migrations), `streams` (Redis Streams and their names), `leases` (revocation leases), `jwt`
(verifying access tokens), `scopes` (the scope catalogue), `errors` (one class per OAuth error
code, and the RFC 6749/6750 answers), `secret_checks` (refusing secrets that are not the
database's), `web`, `logging`, `origins`, `tasks`."""
