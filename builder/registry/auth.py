"""Registry credentials, auth challenges, and the bearer-token cache.

Credentials come from a docker ``config.json`` (inline ``auths``, ``credHelpers``,
``credsStore``) or from imc's own pull secrets, which use the same ``config.json``
form. A password lives only in a ``Credentials`` object, whose repr hides it, and is
never written to a log, a record or an error message.

Tokens are cached per (realm, service, scope): a token for one repository is never
offered for another, which is what registries scope them to.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import AuthError, ValidationError

DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_SECRET_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _endpoint_key(server: str) -> str:
    """Normalise a config.json key (``https://index.docker.io/v1/``, ``host:5000``)."""
    server = re.sub(r"^[a-z]+://", "", server.strip(), flags=re.IGNORECASE).split("/")[0].lower()
    return "docker.io" if server in ("index.docker.io", "registry-1.docker.io") else server


def _from_auth_entry(entry: dict) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username", ""), identity_token=entry["identitytoken"])
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("credentials entry has an 'auth' field that is not base64 of user:password") from None
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None


def _run_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper>`` for the server's credentials (docker's protocol)."""
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise AuthError(f"credential helper docker-credential-{helper} is not installed")
    try:
        out = subprocess.run([program, "get"], input=server.encode(), capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper docker-credential-{helper} timed out") from None
    if out.returncode != 0:
        return None  # helpers exit non-zero for "no credentials for this server"
    try:
        obj = json.loads(out.stdout)
    except ValueError:
        raise AuthError(f"credential helper docker-credential-{helper} answered something that is not JSON") from None
    if not isinstance(obj, dict):
        raise AuthError(f"credential helper docker-credential-{helper} answered JSON that is not an object")
    if obj.get("Username") == "<token>":
        return Credentials(identity_token=obj.get("Secret", ""))
    return Credentials(obj.get("Username", ""), obj.get("Secret", ""))


@dataclass
class DockerConfig:
    """The credentials of one docker ``config.json`` document."""

    auths: dict[str, dict] = field(default_factory=dict)
    cred_helpers: dict[str, str] = field(default_factory=dict)
    creds_store: str | None = None

    @classmethod
    def parse(cls, text: str, origin: str) -> DockerConfig:
        """Parse a config.json document; ``origin`` names it in errors."""
        try:
            obj = json.loads(text)
        except ValueError:
            raise ValidationError(f"{origin} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ValidationError(f"{origin} is not a JSON object")
        auths, helpers = obj.get("auths") or {}, obj.get("credHelpers") or {}
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise ValidationError(f"{origin}: 'auths' and 'credHelpers' must be objects")
        auths = {_endpoint_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        helpers = {_endpoint_key(k): v for k, v in helpers.items() if isinstance(v, str)}
        return cls(auths, helpers, obj.get("credsStore") or None)

    def lookup(self, endpoint: str) -> Credentials | None:
        """Credentials for ``endpoint`` (exact host:port match), or None."""
        key = _endpoint_key(endpoint)
        # Helpers hold Docker Hub's credentials under the server URL docker login uses.
        server = DOCKER_HUB_SERVER if key == "docker.io" else key
        if key in self.cred_helpers:
            return _run_helper(self.cred_helpers[key], server)
        if key in self.auths:
            found = _from_auth_entry(self.auths[key])
            if found:
                return found
        if self.creds_store:
            return _run_helper(self.creds_store, server)
        return None


def docker_config_path() -> Path:
    """Where docker keeps its config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(Path.home(), ".docker")
    return Path(base) / "config.json"


class SecretStore:
    """imc's named pull secrets (``namespace:name``): config.json documents, mode 0600."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def split_name(ref: str) -> tuple[str, str]:
        """Validate ``namespace:name`` (each a DNS-1123 label)."""
        namespace, sep, name = ref.partition(":")
        if not sep or not _SECRET_NAME_RE.match(namespace) or not _SECRET_NAME_RE.match(name):
            raise ValidationError(
                f"invalid pull secret {ref!r}: want namespace:name, lowercase letters, digits and '-'"
            )
        return namespace, name

    def path(self, ref: str) -> Path:
        namespace, name = self.split_name(ref)
        return self.root / namespace / f"{name}.json"

    def create(self, ref: str, registry: str, username: str, password: str) -> Path:
        """Write (or replace) a secret atomically, readable by its owner only."""
        path = self.path(ref)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        doc = json.dumps({"auths": {_endpoint_key(registry): {"auth": auth}}})
        tmp = path.with_suffix(".tmp")
        # A new file, never through a link planted there (nor a leftover that keeps its mode).
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(doc)
        os.replace(tmp, path)
        return path

    def load(self, ref: str) -> DockerConfig:
        """Read a secret, refusing one that others can read (it holds a password)."""
        path = self.path(ref)
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise ValidationError(f"pull secret {ref} does not exist (create it with 'imc secret create')") from None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                    "a directory" if stat.S_ISDIR(st.st_mode) else "special")
            raise ValidationError(f"pull secret {ref} is not a regular file ({kind}): remove {path} and store the "
                                  "secret again with 'imc secret create', as a regular file only you can read "
                                  "(chmod 600)")
        if st.st_mode & 0o077:
            raise ValidationError(
                f"pull secret {ref} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 {path}"
            )
        return DockerConfig.parse(path.read_text(), f"pull secret {ref}")

    def list(self) -> list[str]:
        """Every secret's ``namespace:name``."""
        if not self.root.is_dir():
            return []
        return sorted(f"{p.parent.name}:{p.stem}" for p in self.root.glob("*/*.json"))

    def delete(self, ref: str) -> bool:
        """Remove a secret; False when there was none."""
        try:
            self.path(ref).unlink()
            return True
        except FileNotFoundError:
            return False


class Keychain:
    """Finds credentials for an endpoint: pull secrets first, then docker's config."""

    def __init__(self, configs: list[DockerConfig] | None = None, use_docker_config: bool = True) -> None:
        self._configs = list(configs or [])
        self._use_docker = use_docker_config
        self._docker: DockerConfig | None = None

    def _docker_config(self) -> DockerConfig | None:
        if not self._use_docker:
            return None
        if self._docker is None:
            path = docker_config_path()
            self._docker = DockerConfig.parse(path.read_text(), str(path)) if path.is_file() else DockerConfig()
        return self._docker

    def resolve(self, endpoint: str) -> Credentials | None:
        """The first source that has credentials for ``endpoint`` wins."""
        for config in [*self._configs, self._docker_config()]:
            if config is not None and (found := config.lookup(endpoint)):
                return found
        return None


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme and parameters."""

    scheme: str
    params: dict[str, str]

    @property
    def error(self) -> str | None:
        return self.params.get("error")


_PARAM_RE = re.compile(r'\s*([a-zA-Z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` header into its challenges (RFC 7235)."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = re.compile(r"\s*,?\s*([A-Za-z][\w-]*)\s*").match(header, pos)
        if not m or m.end() == pos:
            break
        scheme, pos = m.group(1), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM_RE.match(header, pos)
            if not p:
                break
            value = p.group(2) if p.group(2) is not None else p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = p.end()
        out.append(Challenge(scheme.lower(), params))
    return out


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens per (realm, service, scope), dropped a little before they expire.

    The clock is injectable so that expiry can be tested without waiting for it.
    """

    # Registries default a missing expires_in to 60 s (distribution token spec).
    DEFAULT_EXPIRES_IN = 60
    EARLY = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> str | None:
        """A token still valid for ``key``, or None."""
        with self._lock:
            token = self._tokens.get(key)
            if token and token.expires_at > self._clock():
                return token.value
            self._tokens.pop(key, None)
            return None

    def put(self, key: tuple[str, str, str], value: str, expires_in: float | None) -> None:
        """Remember a token for ``expires_in`` seconds (less a small margin)."""
        lifetime = float(expires_in or self.DEFAULT_EXPIRES_IN)
        with self._lock:
            self._tokens[key] = _Token(value, self._clock() + max(lifetime - self.EARLY, lifetime / 2))

    def drop(self, key: tuple[str, str, str]) -> None:
        """Forget a token the registry refused."""
        with self._lock:
            self._tokens.pop(key, None)
