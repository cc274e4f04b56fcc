"""The Loopwise Connect benchmark harness (issue 6): `make bench`, `make bench-quick`."""
