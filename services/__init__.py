"""The parts of Loopwise Connect, one package each, and the command that runs them.

`identity` (the authorization server, and `identity/commands.py` its administration
commands), `gateway` (the public listener in front of the rest), `webhooks`, `school_api`
(the reference resource service); `cli` (`loopwise-connect`: the parser and the dispatch);
`dev` (what `make dev` runs: the whole system on one machine, with its stores and demo data).
"""
