"""The school_api service (see CONTRACT.md section 1); built in a later issue."""
