"""Keyset pagination of the history pages: a cursor names the last row shown (time, id).

Used by the access history here and the school's audit log on the admin pages.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def cursor_of(moment: datetime, row_id: int) -> str:
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}.{row_id}"


def parse_cursor(value: str) -> tuple[datetime, int] | None:
    micros, _, row_id = value.partition(".")
    if not (micros.isascii() and micros.isdigit() and row_id.isascii() and row_id.isdigit()):
        return None
    if len(micros) > 18 or len(row_id) > 18:
        return None
    return _EPOCH + timedelta(microseconds=int(micros)), int(row_id)
