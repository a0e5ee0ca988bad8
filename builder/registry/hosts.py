"""Per-endpoint transport policy: HTTPS with verification unless the user says otherwise.

An endpoint is ``host`` or ``host:port`` and matches exactly: listing
``192.168.1.5:5000`` says nothing about ``192.168.1.5``. Nothing is ever guessed from
the host name (not even ``localhost``), so a typo cannot silently turn TLS off.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from builder.errors import ValidationError

_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_ENDPOINT_RE = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:.]+\])(?::([0-9]{{1,5}}))?\Z")


class Transport(enum.Enum):
    """How to reach an endpoint."""

    HTTPS = "https"
    HTTPS_INSECURE = "https-insecure"
    HTTP = "http"


def parse_endpoint_list(text: str | Iterable[str] | None) -> frozenset[str]:
    """Split ``"a, b:5000"`` (or several such strings) into validated endpoints."""
    if text is None:
        return frozenset()
    items = [text] if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        for part in item.split(","):
            endpoint = part.strip()
            if not endpoint:
                continue
            m = _ENDPOINT_RE.match(endpoint)
            if not m or (m.group(1) and not 0 < int(m.group(1)) < 65536):
                raise ValidationError(f"invalid registry endpoint {endpoint!r}: want host or host:port")
            out.add(endpoint.lower())
    return frozenset(out)


def parse_endpoint(text: str, what: str) -> str:
    """Exactly one endpoint, for an option that names one registry (``what`` names it
    in the error): a comma list there is a mistake, not several registries."""
    endpoints = parse_endpoint_list(text)
    if len(endpoints) != 1:
        raise ValidationError(f"{what}: want one registry endpoint (host or host:port), got {text!r}")
    return next(iter(endpoints))


@dataclass(frozen=True)
class HostPolicy:
    """Which endpoints get plain HTTP, which skip verification, and the CA to trust."""

    plain_http: frozenset[str] = frozenset()
    insecure: frozenset[str] = frozenset()
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ValidationError(f"CA file {self.ca_file!r} does not exist")

    def transport(self, endpoint: str) -> Transport:
        """The transport for ``endpoint``; plain HTTP wins if listed in both."""
        key = endpoint.lower()
        if key in self.plain_http:
            return Transport.HTTP
        if key in self.insecure:
            return Transport.HTTPS_INSECURE
        return Transport.HTTPS

    def base_url(self, endpoint: str) -> str:
        """``scheme://endpoint`` for the registry API."""
        scheme = "http" if self.transport(endpoint) is Transport.HTTP else "https"
        return f"{scheme}://{endpoint}"

    def verify(self, endpoint: str) -> bool | str:
        """The ``verify`` argument for requests: a CA bundle, True, or False if listed."""
        if self.transport(endpoint) is Transport.HTTPS_INSECURE:
            return False
        return self.ca_file or True
