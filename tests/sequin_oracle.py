"""The tests' own reading of a Sequin activityRelations message, written independently of connectors/sequin.py:
what a routable change looks like to the tests (the product's decoder is checked against it, not used by it)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def valid_ts(value: Any) -> bool:
    """A Sequin timestamptz as text: ``2025-03-01T10:00:00.000000Z``."""
    if not isinstance(value, str) or not TS.match(value):
        return False
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return False
    return True


def routable(value: bytes | None) -> dict[str, Any] | None:
    """The message if it is a well-formed Sequin change of activityRelations, else None."""
    if value is None:
        return None
    try:
        msg = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(msg, dict) or msg.get("action") not in ("insert", "update", "delete", "read"):
        return None
    rec = msg.get("record")
    if not isinstance(rec, dict) or not isinstance(rec.get("segmentId"), str) or not rec["segmentId"]:
        return None
    if not all(valid_ts(rec.get(c)) for c in ("timestamp", "createdAt", "updatedAt")):
        return None
    return msg
