from __future__ import annotations

import json
import logging
import sys

import pytest

from kvc import logs


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.getLogger("kvc.test").makeRecord("kvc.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    line = logs.JSONFormatter().format(record("replica %s failed", "cifar-0", node="kvc-node-1", attempt=2))
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "kvc.test"
    assert entry["message"] == "replica cifar-0 failed"
    assert entry["node"] == "kvc-node-1"
    assert entry["attempt"] == 2
    assert entry["time"].endswith("+00:00")
    assert "\n" not in line


def test_exceptions_and_odd_values_stay_one_json_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        made = record("failed", path=object())
        made.exc_info = sys.exc_info()
    entry = json.loads(logs.JSONFormatter().format(made))
    assert "ValueError: bad" in entry["exception"]
    assert entry["path"].startswith("<object object")


@pytest.mark.parametrize("json_lines", [True, False])
def test_configure_installs_one_handler_at_the_asked_level(json_lines: bool) -> None:
    logs.configure(verbose=True, json_lines=json_lines)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert root.level == logging.DEBUG
    assert isinstance(root.handlers[0].formatter, logs.JSONFormatter) is json_lines


def test_kopfs_configuration_is_left_out_of_every_line() -> None:
    entry = json.loads(logs.JSONFormatter().format(record("handler succeeded", settings=object(), k8s_skip=False)))
    assert "settings" not in entry
    assert entry["k8s_skip"] is False
