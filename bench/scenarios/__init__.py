"""The scenarios of issue 6, each returning its summary rows."""
