"""Registry credentials, auth challenges, and the bearer-token cache.

Credentials come from imc's own pull secrets, then from the files podman, skopeo and
buildah keep (containers-auth.json(5)), then from docker's ``config.json``: all the
same JSON form (inline ``auths``, ``credHelpers``, ``credsStore``). An ``auths`` key
names a registry (``quay.io``) or a namespace in it (``quay.io/team``,
``host:5000/team/app``); a lookup for a repository takes the most specific key that
holds it, as containers-auth.json(5) says. A password lives only in a
``Credentials`` object, whose repr hides it, and is never written to a log, a record
or an error message.

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
from typing import Any

from builder.errors import AuthError, ValidationError

DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
# Kubernetes rules: a namespace is a DNS-1123 label, a Secret's name a DNS-1123
# subdomain (labels joined by dots, at most 253 characters).
_SECRET_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_SECRET_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
SECRET_NAME_MAX = 253
# Secret types that hold registry credentials, and the data key each keeps them under.
SECRET_TYPES = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}


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
    """Normalise a registry's name (``https://index.docker.io/v1/``, ``host:5000``) to its host."""
    server = re.sub(r"^[a-z]+://", "", server.strip(), flags=re.IGNORECASE).split("/")[0].lower()
    return "docker.io" if server in ("index.docker.io", "registry-1.docker.io") else server


def _auth_key(key: str) -> str:
    """An ``auths`` key as lookups see it: ``host`` or ``host/namespace``.

    A key in URL form (``https://host/v1/``, as docker login wrote them) names its
    host only; a key without a scheme keeps its path, a namespace in that registry.
    """
    key = key.strip()
    if re.match(r"^[a-z]+://", key, flags=re.IGNORECASE):
        return _endpoint_key(key)
    host, _, path = key.partition("/")
    path = path.strip("/")
    return f"{_endpoint_key(host)}/{path}" if path else _endpoint_key(host)


def _namespaces(host: str, repository: str | None) -> list[str]:
    """The keys that may hold a repository's credentials, most specific first:
    ``h/a/b/c``, ``h/a/b``, ``h/a``, ``h``."""
    parts = repository.strip("/").split("/") if repository else []
    return [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [host]


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
        # A plain key wins over a URL-form key for the same registry (written later, by newer tools).
        ordered = sorted((k for k, v in auths.items() if isinstance(v, dict)),
                         key=lambda k: not re.match(r"^[a-z]+://", k.strip(), flags=re.IGNORECASE))
        auths = {_auth_key(k): auths[k] for k in ordered}
        helpers = {_endpoint_key(k): v for k, v in helpers.items() if isinstance(v, str)}
        return cls(auths, helpers, obj.get("credsStore") or None)

    def lookup(self, endpoint: str, repository: str | None = None) -> Credentials | None:
        """Credentials for ``repository`` on ``endpoint`` (host:port matched exactly),
        from the most specific ``auths`` key that holds it, or None."""
        key = _endpoint_key(endpoint)
        # Helpers hold Docker Hub's credentials under the server URL docker login uses.
        server = DOCKER_HUB_SERVER if key == "docker.io" else key
        if key in self.cred_helpers:
            return _run_helper(self.cred_helpers[key], server)
        for candidate in _namespaces(key, repository):
            if candidate in self.auths and (found := _from_auth_entry(self.auths[candidate])):
                return found
        if self.creds_store:
            return _run_helper(self.creds_store, server)
        return None


def docker_config_path() -> Path:
    """Where docker keeps its config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(Path.home(), ".docker")
    return Path(base) / "config.json"


def containers_auth_paths() -> list[Path]:
    """The files podman, skopeo and buildah keep credentials in, in the order
    containers-auth.json(5) reads them: ``$REGISTRY_AUTH_FILE`` (what ``--authfile``
    sets) or else ``$XDG_RUNTIME_DIR/containers/auth.json``, then
    ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config`` by default)."""
    primary = os.environ.get("REGISTRY_AUTH_FILE")
    if not primary:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
        primary = os.path.join(runtime, "containers", "auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return [Path(primary), Path(config_home) / "containers" / "auth.json"]


def credential_files() -> list[Path]:
    """Every credentials file of the user's environment, in the order they are read:
    containers' then docker's."""
    return [*containers_auth_paths(), docker_config_path()]


class SecretStore:
    """imc's named pull secrets (``namespace:name``): config.json documents, mode 0600."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def split_name(ref: str) -> tuple[str, str]:
        """Validate ``namespace:name`` as Kubernetes names them: the namespace a DNS-1123
        label, the name a DNS-1123 subdomain (dots allowed)."""
        namespace, sep, name = ref.partition(":")
        if (not sep or not _SECRET_NAMESPACE_RE.match(namespace) or not _SECRET_NAME_RE.match(name)
                or len(name) > SECRET_NAME_MAX):
            shown = repr(ref) if len(ref) <= 300 else repr(ref[:300]) + "…"
            raise ValidationError(
                f"invalid pull secret {shown}: want namespace:name, lowercase letters, digits and '-' "
                "(and '.' in the name), as Kubernetes names a Secret"
            )
        return namespace, name

    def path(self, ref: str) -> Path:
        namespace, name = self.split_name(ref)
        return self.root / namespace / f"{name}.json"

    def create(self, ref: str, registry: str, username: str, password: str) -> Path:
        """Write (or replace) a secret for one registry, readable by its owner only."""
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        return self.store(ref, {_endpoint_key(registry): {"auth": auth}})

    def store(self, ref: str, auths: dict[str, dict[str, str]]) -> Path:
        """Write (or replace) a secret holding credentials for one or more registries
        (``auths`` as :func:`registry_auths` returns it), atomically, mode 0600."""
        path = self.path(ref)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = json.dumps({"auths": auths})
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


_AUTH_FIELDS = ("auth", "username", "password", "identitytoken")


def registry_auths(obj: Any, origin: str) -> dict[str, dict[str, str]]:
    """The ``auths`` map of a config.json (or the whole of a legacy ``.dockercfg``),
    checked: at least one registry, each entry with usable credentials. Only the
    credential fields are kept: a stored secret never names a credential helper, so a
    file cannot make imc run a program. Errors name the registry, never a credential."""
    if not isinstance(obj, dict) or not obj:
        raise ValidationError(f"{origin}: no registry credentials (want an 'auths' map of registry to credentials)")
    out: dict[str, dict[str, str]] = {}
    for server, entry in obj.items():
        key = _auth_key(str(server))
        if not key or not isinstance(entry, dict):
            raise ValidationError(f"{origin}: registry {str(server)[:200]!r}: want an object with auth, or "
                                  "username and password")
        kept = {f: entry[f] for f in _AUTH_FIELDS if isinstance(entry.get(f), str) and entry[f]}
        try:
            usable = _from_auth_entry(kept)
        except ValidationError as e:
            raise ValidationError(f"{origin}: registry {key}: {e.message}") from None
        if usable is None:
            raise ValidationError(f"{origin}: registry {key} has no credentials (want auth, or username and "
                                  "password, or identitytoken)")
        out[key] = kept
    return out


def pull_secret_from_object(obj: Any, origin: str) -> tuple[str | None, dict[str, dict[str, str]]]:
    """A pull secret from a parsed document: a Kubernetes Secret of type
    ``kubernetes.io/dockerconfigjson`` or ``kubernetes.io/dockercfg`` (exactly what
    ``kubectl create secret docker-registry … --dry-run=client -o yaml`` prints, or with
    ``stringData``), or a plain docker ``config.json``. Returns the Secret's
    ``namespace:name`` (namespace ``default`` when absent; None for a config.json) and
    its credentials by registry."""
    if not isinstance(obj, dict):
        raise ValidationError(f"{origin}: not an object (want a Secret or a docker config.json)")
    if obj.get("kind") != "Secret":
        if "auths" in obj:
            return None, registry_auths(obj["auths"], origin)
        raise ValidationError(f"{origin}: want a Secret of type kubernetes.io/dockerconfigjson or a docker "
                              "config.json with 'auths'")
    if obj.get("apiVersion") != "v1":
        raise ValidationError(f"{origin}: Secret apiVersion: want v1, got {obj.get('apiVersion')!r}")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValidationError(f"{origin}: Secret metadata must be an object")
    ref = f"{metadata.get('namespace') or 'default'}:{metadata.get('name') or ''}"
    SecretStore.split_name(ref)
    secret_type = obj.get("type")
    key = SECRET_TYPES.get(secret_type)  # type: ignore[arg-type]
    if key is None:
        raise ValidationError(f"{origin}: Secret {ref} has type {secret_type!r}: want "
                              f"{' or '.join(SECRET_TYPES)}")
    data, string_data = obj.get("data") or {}, obj.get("stringData") or {}
    if not isinstance(data, dict) or not isinstance(string_data, dict):
        raise ValidationError(f"{origin}: Secret {ref}: data and stringData must be maps")
    if isinstance(string_data.get(key), str):
        text = string_data[key]
    elif isinstance(data.get(key), str):
        try:
            text = base64.b64decode(data[key], validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise ValidationError(f"{origin}: Secret {ref}: data.{key} is not base64 of UTF-8 text") from None
    else:
        raise ValidationError(f"{origin}: Secret {ref} has no data.{key}")
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValidationError(f"{origin}: Secret {ref}: {key} is not JSON") from None
    if key == ".dockerconfigjson":
        doc = doc.get("auths") if isinstance(doc, dict) else None
    return ref, registry_auths(doc, f"{origin}: Secret {ref}")


def _read_config(path: Path) -> DockerConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValidationError(f"credentials file {path} cannot be read: {e.strerror}") from None
    return DockerConfig.parse(text, str(path))


class Keychain:
    """Finds credentials for a repository: pull secrets first, then the user's files
    (containers' auth.json files, then docker's config.json) unless
    ``use_docker_config`` is False. Files are read once, when first needed; one that
    does not exist holds nothing."""

    def __init__(self, configs: list[DockerConfig] | None = None, use_docker_config: bool = True) -> None:
        self._configs = list(configs or [])
        self._use_files = use_docker_config
        self._files: list[DockerConfig] | None = None
        self._lock = threading.Lock()

    def _file_configs(self) -> list[DockerConfig]:
        if not self._use_files:
            return []
        with self._lock:
            if self._files is None:
                self._files = [_read_config(p) for p in credential_files() if p.is_file()]
            return self._files

    def resolve(self, endpoint: str, repository: str | None = None) -> Credentials | None:
        """The first source that has credentials for ``repository`` on ``endpoint``
        wins; within a source, the most specific namespace."""
        for config in [*self._configs, *self._file_configs()]:
            if found := config.lookup(endpoint, repository):
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
