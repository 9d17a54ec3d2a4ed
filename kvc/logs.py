"""Logging setup shared by every `kvc` command: text for people, JSON lines for collectors.

No credential reaches a log, at any level and in either format: libraries that print
request and response bodies or headers at DEBUG are kept at INFO, and every line is
scrubbed on its way out (``redact``) of private keys, authorization headers, signed-URL
parameters and the values of every Secret this process has read (``register_secret``).
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import logging
import re
import threading

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# kopf passes its whole configuration with every message about an object: the same on every
# line, and its repr cost more than the rest of the line.
_OMITTED = frozenset({"settings"})


# Loggers that print whole request or response bodies and headers at DEBUG: every Secret the
# kubernetes client reads (kubernetes.client.rest logs each response body), SigV4
# Authorization headers (botocore). Their debug output is never worth a credential.
_BODY_LOGGERS = ("kubernetes.client.rest", "botocore", "boto3", "s3transfer")

_REDACTED = "[redacted]"
# What a credential looks like in a line, whatever the code that logged it; and what stays.
_PATTERNS = (
    # A PEM private key (a CA's or a serving key), whole or cut short; and a base64 PEM, as in a
    # Secret's data ("-----BEGIN " encodes to LS0tLS1CRUdJTi...).
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)", re.DOTALL),
        _REDACTED,
    ),
    (re.compile(r"LS0tLS1CRUdJTi[A-Za-z0-9+/=]*"), _REDACTED),
    # A SigV4 Authorization value wherever it appears, and signed-URL query parameters.
    (re.compile(r"AWS4-HMAC-SHA256 Credential=[^\s,\"'\\]+(?:,\s*\w+=[^\s,\"'\\]+)*"), f"AWS4-HMAC-SHA256 {_REDACTED}"),
    # Header values: in a dict's repr, in JSON (quotes escaped), or as a raw header line.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-amz-security-token|x-api-key)"
            r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\"'\\\r\n,}]+"
        ),
        rf"\1\2{_REDACTED}",
    ),
    (
        re.compile(
            r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|"
            r"api_key|apikey|key|password)=)[^&\s\"'\\]+"
        ),
        rf"\1{_REDACTED}",
    ),
)
# Registered values shorter than this are not redacted: they would blank common words.
_MIN_SECRET_LENGTH = 6
# Forms kept (about 100 bytes each): a controller reads every tenant's Secrets. Past this, the
# oldest are forgotten first; the patterns above still catch what looks like a credential.
_MAX_SECRETS = 65536


class _SecretValues:
    """The values of Secrets this process has read, and their base64 forms.

    Found in one pass over a line whatever their number: each value is indexed by its first
    ``_MIN_SECRET_LENGTH`` characters, and only lines holding such a prefix are looked at
    further (a regular expression of thousands of alternatives costs milliseconds per line).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: collections.OrderedDict[str, None] = collections.OrderedDict()
        # prefix -> values with that prefix, longest first; replaced, never changed in place.
        self._by_prefix: dict[str, tuple[str, ...]] = {}

    def add(self, value: str | bytes) -> None:
        raw = value if isinstance(value, bytes) else value.encode()
        forms = {raw.decode(errors="replace"), base64.b64encode(raw).decode()}
        with self._lock:
            table = dict(self._by_prefix)
            for form in forms:
                if len(form) < _MIN_SECRET_LENGTH or form in self._order:
                    continue
                self._order[form] = None
                self._index(table, form, add=True)
                while len(self._order) > _MAX_SECRETS:
                    forgotten, _ = self._order.popitem(last=False)
                    self._index(table, forgotten, add=False)
            self._by_prefix = table

    @staticmethod
    def _index(table: dict[str, tuple[str, ...]], form: str, *, add: bool) -> None:
        prefix = form[:_MIN_SECRET_LENGTH]
        values = {*table.get(prefix, ()), form} if add else set(table.get(prefix, ())) - {form}
        if values:
            table[prefix] = tuple(sorted(values, key=len, reverse=True))
        else:
            table.pop(prefix, None)

    def scrub(self, text: str) -> str:
        table = self._by_prefix
        if not table or len(text) < _MIN_SECRET_LENGTH:
            return text
        width = _MIN_SECRET_LENGTH
        parts: list[str] = []
        done = 0
        for start in range(len(text) - width + 1):
            if start < done or text[start : start + width] not in table:
                continue
            # Longest first: a value that contains another is replaced whole.
            found = next((v for v in table[text[start : start + width]] if text.startswith(v, start)), None)
            if found is not None:
                parts += [text[done:start], _REDACTED]
                done = start + len(found)
        return "".join([*parts, text[done:]]) if parts else text


_SECRETS = _SecretValues()


def register_secret(value: str | bytes) -> None:
    """Never log ``value`` (nor its base64 form) from now on: call it for every Secret value read."""
    _SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` without anything that looks like a credential or was registered as one."""
    text = _SECRETS.scrub(text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class Redacting(logging.Formatter):
    """Another formatter's lines, ``redact``-ed: messages, arguments, extra fields and tracebacks alike.

    Each part is scrubbed before the other formatter encodes it (JSON escapes quotes and
    backslashes, which would hide a value containing them); what the formatter adds (time,
    level, logger name) holds nothing to scrub, so the line is not scanned again.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        scrubbed = logging.makeLogRecord(vars(record))
        scrubbed.msg, scrubbed.args = redact(record.getMessage()), None
        if record.exc_info:
            scrubbed.exc_text = redact(self.inner.formatException(record.exc_info))
        if record.stack_info:
            scrubbed.stack_info = redact(record.stack_info)
        for key, value in vars(record).items():
            if key in _STANDARD or key in _OMITTED or isinstance(value, int | float | bool | None):
                continue
            setattr(scrubbed, key, redact(value if isinstance(value, str) else repr(value)))
        return self.inner.format(scrubbed)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, exception, and `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:  # formatted already (and scrubbed: Redacting)
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _OMITTED and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        return json.dumps(entry, ensure_ascii=False)


def configure(verbose: bool = False, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        Redacting(
            JSONFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _BODY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
