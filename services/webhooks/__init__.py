"""The webhooks service (see CONTRACT.md section 1); built in a later issue."""
