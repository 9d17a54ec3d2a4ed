from __future__ import annotations

import base64
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
    formatter = root.handlers[0].formatter
    assert isinstance(formatter, logs.Redacting)
    assert isinstance(formatter.inner, logs.JSONFormatter) is json_lines


def test_kopfs_configuration_is_left_out_of_every_line() -> None:
    entry = json.loads(logs.JSONFormatter().format(record("handler succeeded", settings=object(), k8s_skip=False)))
    assert "settings" not in entry
    assert entry["k8s_skip"] is False


# --------------------------------------------------------------------------- no credential in a log

CA_KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBs3cr3tK3yM4ter1al\n-----END EC PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("request headers {'Authorization': 'Bearer hf_s3cr3t', 'Range': 'bytes=0-'}", "hf_s3cr3t"),
        ('{"headers": {\\"Authorization\\": \\"Bearer hf_s3cr3t\\"}}', "hf_s3cr3t"),
        ("Cookie: session=hf_s3cr3t", "hf_s3cr3t"),
        (
            "authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261203/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        ),
        ("GET https://bucket.s3/model.bin?X-Amz-Signature=0badc0ffee&X-Amz-Date=20261203", "0badc0ffee"),
        ("GET https://hub/model.bin?token=hf_s3cr3t", "hf_s3cr3t"),
        (f"created CA {CA_KEY} done", "MHcCAQEEIBs3cr3tK3yM4ter1al"),
        (f"response body: {{'tls.key': '{base64.b64encode(CA_KEY.encode()).decode()}'}}", "LS0tLS1CRUdJTi"),
    ],
)
def test_credentials_that_look_like_credentials_are_redacted(line: str, secret: str) -> None:
    redacted = logs.redact(line)
    assert secret not in redacted
    assert "[redacted]" in redacted


def test_registered_secret_values_are_redacted_in_plain_and_base64_forms() -> None:
    logs.register_secret("wJalrXUtnFEMI-registered")
    encoded = base64.b64encode(b"wJalrXUtnFEMI-registered").decode()
    line = logs.redact(f"read {{'aws_secret': 'wJalrXUtnFEMI-registered', 'data': '{encoded}'}}")
    assert "wJalrXUtnFEMI" not in line
    assert encoded not in line
    # Short values would blank ordinary words: they are left alone.
    logs.register_secret("abc")
    assert logs.redact("abc def") == "abc def"


def test_what_is_not_a_credential_is_left_alone() -> None:
    line = "replica ns.vm.cifar-0a1b failed: s3://bucket/key answered 403 (attempt 2; retrying in 10s)"
    assert logs.redact(line) == line


@pytest.mark.parametrize("json_lines", [True, False])
def test_debug_logging_never_prints_a_secret_read_through_the_kubernetes_client(
    json_lines: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """kubernetes.client.rest logs every response body at DEBUG: with -v it would print Secrets."""
    logs.configure(verbose=True, json_lines=json_lines)
    try:
        encoded = base64.b64encode(b"plain-secret-value").decode()
        logging.getLogger("kubernetes.client.rest").debug("response body: {'data': {'k': '%s'}}", encoded)
        logging.getLogger("botocore.endpoint").debug("Sending http request: <AWSPreparedRequest headers=%s>", "x")
        logging.getLogger("kvc.test").debug(
            "sending %s",
            {"Authorization": "Bearer plain-secret-value"},
            extra={"headers": {"Authorization": "Bearer plain-secret-value"}},
        )
        logging.getLogger("kvc.test").debug("a debug line of KVC's own")
    finally:
        logs.configure()
    output = capsys.readouterr().err
    assert "a debug line of KVC's own" in output  # -v still shows KVC's own debug lines
    assert encoded not in output
    assert "plain-secret-value" not in output
    assert "AWSPreparedRequest" not in output


@pytest.mark.parametrize("json_lines", [True, False])
def test_a_secret_with_quotes_backslashes_or_newlines_is_redacted_before_it_is_escaped(
    json_lines: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON escapes `"` and `\\`: a value scrubbed only after encoding would go through."""
    secret = 'p4ss"w\\rd!\nx'
    logs.register_secret(secret)
    logs.configure(json_lines=json_lines)
    try:
        logging.getLogger("kvc.test").warning("read %s", secret, extra={"value": secret, "attempt": 2})
        try:
            raise ValueError(f"bad {secret}")
        except ValueError:
            logging.getLogger("kvc.test").exception("failed")
    finally:
        logs.configure()
    output = capsys.readouterr().err
    for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], 'p4ss\\"w'):
        assert form not in output
    assert "[redacted]" in output
    if json_lines:
        first = json.loads(output.splitlines()[0])
        assert first["attempt"] == 2  # numbers stay numbers


def test_thousands_of_registered_secrets_are_all_redacted() -> None:
    values = [f"tenant-{i:05d}-s3cr3t" for i in range(5000)]
    for value in values:
        logs.register_secret(value)
    line = " ".join(values[::499])
    assert logs.redact(line) == " ".join(["[redacted]"] * len(values[::499]))
