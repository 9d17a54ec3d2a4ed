"""Logging setup shared by every `kvc` command: text for people, JSON lines for collectors."""

from __future__ import annotations

import datetime as dt
import json
import logging

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# kopf passes its whole configuration with every message about an object: the same on every
# line, and its repr cost more than the rest of the line.
_OMITTED = frozenset({"settings"})


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, exception, and `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _OMITTED and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        return json.dumps(entry, ensure_ascii=False)


def configure(verbose: bool = False, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JSONFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
