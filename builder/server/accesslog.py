"""The access log of ``imc serve``: one line per request, as registry:2 writes one.

Time, client, method, path, status, bytes sent and duration, as text or as JSON lines.
What a request carries that could be a secret never reaches the log: headers are not
logged at all, and a query value is kept only for parameters known to hold none (a
registry's ``ns`` and paging, the API's watch and selectors); every other value is
replaced, so a ``?token=`` or ``?X-Amz-Signature=`` a client adds stays out.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

ACCESS_LOGGER = "builder.server.access"

SAFE_QUERY = frozenset({
    "ns", "n", "last", "digest", "watch", "resourceVersion", "resourceVersionMatch", "timeoutSeconds",
    "allowWatchBookmarks", "sendInitialEvents", "labelSelector", "fieldSelector", "limit", "pretty",
    "fieldManager", "fieldValidation", "dryRun", "force", "propagationPolicy", "includeObject",
})
"""Query parameters whose values are logged; any other value is redacted."""

REDACTED = "REDACTED"
MAX_PATH = 1024
"""Characters of a request target logged: a client must not make the log huge."""

log = logging.getLogger(ACCESS_LOGGER)


def redact_target(target: str) -> str:
    """The request target as logged: query values outside ``SAFE_QUERY`` redacted,
    anything but printable ASCII percent-escaped (no forged lines), bounded in length."""
    parts = urlsplit(target)
    path = quote(parts.path, safe="/:@!$&'()*+,;=-._~%")
    if parts.query:
        pairs = [(k, v if k in SAFE_QUERY else REDACTED) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        path += "?" + urlencode(pairs, safe=":/,=")
    return path if len(path) <= MAX_PATH else path[:MAX_PATH] + "..."


def record(client: str, method: str, target: str, status: int, sent: int, seconds: float) -> None:
    """Log one answered request at INFO."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {"client": client, "method": quote(method[:16], safe=""), "path": redact_target(target),
              "status": status, "bytes": sent, "duration": round(seconds, 6)}
    log.info('%s "%s %s" %d %d %.3fs', fields["client"], fields["method"], fields["path"], status, sent, seconds,
             extra={"access": fields})


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, the time in UTC (an access line reads like the
    combined log format: client, "method path", status, bytes, duration)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``msg``, and an access
    line's fields (``client``, ``method``, ``path``, ``status``, ``bytes``, ``duration``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"time": _timestamp(record.created), "level": record.levelname.lower(),
                                  "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "access", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out)
