"""Image references, parsed and normalised the way docker does, with no I/O.

``nginx:1.7.9`` is ``docker.io/library/nginx:1.7.9``; ``host:5000/team/app:1.0`` keeps
its registry; ``repo@sha256:…`` pins content, and a tag beside a digest is kept for
display but the digest is what is fetched. The grammar is distribution's
(reference/regexp.go), so what registries accept, we accept, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.digest import Digest
from builder.errors import BadReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
REPOSITORY_RE = re.compile(rf"^{PATH_COMPONENT}(?:/{PATH_COMPONENT})*\Z")  # \Z, not $: no trailing newline
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?\Z"
)
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}\Z", re.ASCII)
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry, repository, and a tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``registry/repository``, the familiar full name."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host:port that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a registry if it has '.' or ':', is
    'localhost', or has upper case; otherwise the image lives on Docker Hub."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain in _HUB_ALIASES:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    return domain, path


def parse(text: str) -> Reference:
    """Parse and normalise an image reference, or raise ``BadReferenceError`` saying why."""
    if not text or text != text.strip():
        raise BadReferenceError(f"invalid image reference {text!r}: empty or surrounded by spaces")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, _, digest_text = remainder.partition("@")
        try:
            digest = Digest.parse(digest_text)
        except BadReferenceError as e:
            raise BadReferenceError(f"invalid image reference {text!r}: {e.message}") from None
    tag = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not TAG_RE.match(tag):
            raise BadReferenceError(
                f"invalid image reference {text!r}: bad tag {tag!r} "
                "(letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')"
            )
    if not remainder:
        raise BadReferenceError(f"invalid image reference {text!r}: no repository")
    domain, path = _split_domain(remainder)
    if not _DOMAIN_RE.match(domain):
        raise BadReferenceError(f"invalid image reference {text!r}: bad registry {domain!r}")
    if not REPOSITORY_RE.match(path):
        raise BadReferenceError(
            f"invalid image reference {text!r}: bad repository {path!r} "
            "(lowercase letters, digits and separators '.', '_', '__', '-' between them)"
        )
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise BadReferenceError(f"invalid image reference {text!r}: name longer than {MAX_NAME_LENGTH}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def valid_repository(name: str) -> bool:
    """True when ``name`` is a well-formed repository path (for names arriving in URLs)."""
    return len(name) <= MAX_NAME_LENGTH and bool(REPOSITORY_RE.match(name))
