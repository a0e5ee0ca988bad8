"""Per-endpoint transport policy: HTTPS with verification unless the user says otherwise.

An endpoint is ``host`` or ``host:port`` and matches exactly: listing
``192.168.1.5:5000`` says nothing about ``192.168.1.5``. Nothing is ever guessed from
the host name (not even ``localhost``), so a typo cannot silently turn TLS off.

With ``internal_redirects=False`` (what ``imc serve --pull-through`` uses, since its
requests come from other machines) a registry on a public address may not redirect
to a loopback, link-local or private one: otherwise anyone who can make imc fetch
from that registry could steer it at services inside the node's network.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from builder.errors import TransportError, ValidationError

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


def is_internal(host: str) -> bool:
    """True if ``host`` (an address, or a name and every address it resolves to) is not
    a public address: loopback, link-local, private, shared, reserved or unspecified.
    A name that does not resolve counts as internal: nothing proves it is public."""
    host = host.strip("[]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return True
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            return True
    return not addresses


@dataclass(frozen=True)
class HostPolicy:
    """Which endpoints get plain HTTP, which skip verification, the CA to trust, and
    whether a public registry may redirect to an internal address."""

    plain_http: frozenset[str] = frozenset()
    insecure: frozenset[str] = frozenset()
    ca_file: str | None = None
    internal_redirects: bool = True
    internal: Callable[[str], bool] = is_internal

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

    def check_redirect(self, endpoint: str, url: str) -> None:
        """Refuse a redirect from ``endpoint`` to ``url`` that leads from a public
        address to an internal one, unless such redirects are allowed."""
        if self.internal_redirects:
            return
        target = urlsplit(url).hostname or ""
        if self.internal(target) and not self.internal(_host(endpoint)):
            raise TransportError(f"{endpoint} redirected to {target}, an internal address; refused: a public "
                                 "registry may not send imc serve into the local network", temporary=False)

    def verify(self, endpoint: str) -> bool | str:
        """The ``verify`` argument for requests: a CA bundle, True, or False if listed."""
        if self.transport(endpoint) is Transport.HTTPS_INSECURE:
            return False
        return self.ca_file or True


def _host(endpoint: str) -> str:
    """The host of ``host``, ``host:port`` or ``[v6]:port``."""
    if endpoint.startswith("["):
        return endpoint[1:endpoint.index("]")]
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint
