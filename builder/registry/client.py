"""The registry client: manifests as exact verified bytes, blobs streamed with resume.

One ``Registry`` talks to one endpoint. It owns the whole exchange so that the rest of
imc never sees requests or ssl: auth challenges and token refresh, retries with
backoff (5xx, 429 with Retry-After, dropped connections), timeouts on every request,
and redirects followed by hand so that credentials never leave the registry's host.

Pushing (``Registry(..., push=True)``) asks for ``repository:NAME:pull,push`` tokens
and adds blob uploads (monolithic, or chunked with PATCH and ``Content-Range``), a
blob existence check, and manifest PUT. A chunked upload that loses its connection
asks the registry where the session stands (GET on the upload URL answers
``Range: 0-N``) and goes on from there; a registry that forgot or cancelled the
session (registry:2 cancels one whose PATCH was cut mid-body: its upload URL carries
the offset in a signed ``_state``, which no longer matches) gets a new session for
that blob. We do not use oras-py for this: its single token is reused across
repositories and never refreshed, and its session is not thread-safe (DESIGN.md).
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import requests.adapters
import urllib3

from builder import __version__
from builder.digest import Digest
from builder.errors import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    StoreError,
    TLSError,
    TransportError,
    UnsupportedError,
)
from builder.oci import ACCEPT, MAX_MANIFEST_SIZE
from builder.registry.auth import Challenge, Credentials, Keychain, TokenCache, parse_challenges
from builder.registry.hosts import HostPolicy, Transport

log = logging.getLogger(__name__)
# Skipping verification is the user's explicit choice (--insecure), not news to warn of.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

CHUNK = 1 << 20
UPLOAD_CHUNK = 16 << 20
"""Bytes per PATCH of a chunked upload: what a registry that keeps sessions loses at
most when a connection drops, against one round trip per chunk."""
USER_AGENT = f"imc/{__version__}"
_REDIRECTS = {301, 302, 303, 307, 308}


class BlobSink(Protocol):
    """Where a blob's bytes go: the store's ingest file, which hashes as it writes."""

    @property
    def offset(self) -> int:
        """Bytes already held, from which a download resumes."""

    def write(self, data: memoryview | bytes) -> None:
        """Append bytes."""

    def reset(self) -> None:
        """Drop what is held: the server would not resume, so start again."""


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest's exact bytes, its digest, and the media type the registry declared."""

    raw: bytes
    digest: Digest
    media_type: str


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts without progress, backoff, timeouts (connect, read)."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    timeout: tuple[float, float] = (10.0, 60.0)


def _error_codes(resp: requests.Response) -> tuple[tuple[str, ...], str]:
    """The spec's error codes and first message from a registry's JSON error body."""
    try:
        body = json.loads(resp.content[:65536] or b"{}")
        errors = body.get("errors") or []
        codes = tuple(str(e.get("code", "")) for e in errors if isinstance(e, dict))
        message = next((str(e.get("message", "")) for e in errors if isinstance(e, dict)), "")
        return codes, message
    except (ValueError, AttributeError):
        return (), ""


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Registry:
    """A client for one registry endpoint (``host`` or ``host:port``)."""

    def __init__(
        self,
        endpoint: str,
        policy: HostPolicy | None = None,
        keychain: Keychain | None = None,
        tokens: TokenCache | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        push: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.push = push
        self.policy = policy or HostPolicy()
        self.keychain = keychain or Keychain()
        self.tokens = tokens or TokenCache()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.base = self.policy.base_url(endpoint)
        self._local = threading.local()
        self._challenge: Challenge | None = None
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._lock = threading.Lock()

    # -- transport -----------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # No proxies or .netrc from the environment: a registry gets exactly the
            # credentials imc chose for it, and loopback stays loopback.
            session.trust_env = False
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    def _tls_hint(self) -> str:
        transport = self.policy.transport(self.endpoint)
        if transport is Transport.HTTPS:
            return (f"; if {self.endpoint} uses a private CA pass --ca-file, or list it with "
                    f"--insecure {self.endpoint} (HTTPS without verification) or "
                    f"--plain-http {self.endpoint} (plain HTTP)")
        return ""

    def _send(self, method: str, url: str, headers: dict[str, str], stream: bool,
              data: bytes | None = None) -> requests.Response:
        """One HTTP exchange, with library errors translated to ours."""
        host = urlsplit(url).netloc
        try:
            return self._session().request(
                method, url, headers=headers, stream=stream, allow_redirects=False, data=data,
                timeout=self.retry.timeout, verify=self.policy.verify(host),
            )
        except requests.exceptions.SSLError as e:
            reason = str(e.__context__ or e)
            if "WRONG_VERSION_NUMBER" in reason or "wrong version number" in reason:
                raise TLSError(f"{host} does not speak TLS; if it is a plain HTTP registry, "
                               f"list it with --plain-http {host}") from None
            detail = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in reason else "TLS handshake failed"
            raise TLSError(f"TLS error talking to {host}: {detail}{self._tls_hint()}") from None
        except requests.exceptions.ConnectTimeout:
            raise TransportError(f"cannot connect to {host}: connection timed out") from None
        except requests.exceptions.ReadTimeout:
            raise TransportError(f"{host} did not answer in time (read timeout)") from None
        except requests.exceptions.ConnectionError as e:
            text = str(e)
            if "NameResolution" in text or "Name or service not known" in text or "nodename" in text:
                # A name that does not resolve will not start to on a retry.
                raise TransportError(f"cannot resolve registry host {host}", temporary=False) from None
            if "Connection refused" in text:
                raise TransportError(f"cannot connect to {host}: connection refused") from None
            raise TransportError(f"connection to {host} failed: {type(e).__name__}") from None
        except requests.exceptions.RequestException as e:
            raise TransportError(f"request to {host} failed: {type(e).__name__}") from None

    # -- auth ----------------------------------------------------------------------

    def _credentials(self) -> Credentials | None:
        with self._lock:
            if not self._creds_loaded:
                self._creds = self.keychain.resolve(self.endpoint)
                self._creds_loaded = True
            return self._creds

    def _scope(self, repository: str) -> str:
        return f"repository:{repository}:{'pull,push' if self.push else 'pull'}"

    def _token_key(self, challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return (challenge.params.get("realm", ""), challenge.params.get("service", ""), scope)

    def _auth_header(self, repository: str | None) -> str | None:
        """What to send up front, from the challenge this registry already gave us."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials()
            return creds.basic_header() if creds and creds.password else None
        if challenge.scheme == "bearer" and repository:
            token = self.tokens.get(self._token_key(challenge, self._scope(repository)))
            return f"Bearer {token}" if token else None
        return None

    def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        """Ask the challenge's realm for a token for ``scope``."""
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"{self.endpoint} sent a bearer challenge without a usable realm")
        service = challenge.params.get("service", "")
        creds = self._credentials()
        headers: dict[str, str] = {}
        if creds and creds.identity_token:
            body = urlencode({"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                              "service": service, "scope": scope, "client_id": "imc"})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = self._token_request("POST", realm, headers, body)
        else:
            if creds and creds.password:
                headers["Authorization"] = creds.basic_header()
            query = urlencode([("service", service), ("scope", scope)] if service else [("scope", scope)])
            resp = self._token_request("GET", f"{realm}{'&' if '?' in realm else '?'}{query}", headers, None)
        if resp.status_code in (401, 403):
            who = f"user {creds.username!r}" if creds and creds.username else "anonymous access"
            raise AuthError(f"{self.endpoint}: token service refused {who} for {scope} ({resp.status_code})",
                            status=resp.status_code)
        if resp.status_code != 200:
            raise AuthError(f"{self.endpoint}: token service answered {resp.status_code} for {scope}",
                            status=resp.status_code, temporary=resp.status_code >= 500)
        try:
            obj = resp.json()
            token = obj.get("token") or obj.get("access_token")
        except ValueError:
            token, obj = None, {}
        if not token:
            raise AuthError(f"{self.endpoint}: token service answered without a token")
        self.tokens.put(self._token_key(challenge, scope), token, obj.get("expires_in"))
        return token

    def _token_request(self, method: str, url: str, headers: dict[str, str], body: str | None) -> requests.Response:
        host = urlsplit(url).netloc
        try:
            return self._session().request(method, url, headers=headers, data=body, timeout=self.retry.timeout,
                                           verify=self.policy.verify(host), allow_redirects=False)
        except requests.exceptions.SSLError:
            raise TLSError(f"TLS error talking to token service {host}{self._tls_hint()}") from None
        except requests.exceptions.RequestException as e:
            raise TransportError(f"token service {host} unreachable: {type(e).__name__}") from None

    def _answer_challenge(self, resp: requests.Response, repository: str | None, sent: str | None) -> str:
        """Learn from a 401 and return the Authorization to retry with."""
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        challenge = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if challenge is None:
            raise AuthError(f"{self.endpoint} requires authentication but sent no usable challenge", status=401)
        self._challenge = challenge
        if challenge.scheme == "basic":
            creds = self._credentials()
            if not creds or not creds.password:
                raise AuthError(f"{self.endpoint} requires credentials: none found (docker config.json or "
                                "--pull-secret)", status=401)
            header = creds.basic_header()
            if sent == header:
                raise AuthError(f"{self.endpoint}: credentials for user {creds.username!r} were rejected (401)",
                                status=401)
            return header
        # Key tokens by our own scope string: registries vary the action order in theirs.
        scope = self._scope(repository) if repository else challenge.params.get("scope", "")
        key = self._token_key(challenge, scope)
        if sent is not None and sent.startswith("Bearer "):
            self.tokens.drop(key)  # expired, revoked, or insufficient_scope: ask again
        return f"Bearer {self._fetch_token(challenge, scope)}"

    # -- requests with auth, retries and redirects ----------------------------------------

    def _request(
        self, method: str, path: str, repository: str | None, headers: dict[str, str] | None = None,
        stream: bool = False, data: bytes | None = None, retry: bool = True,
    ) -> requests.Response:
        """Send with auth, follow redirects safely, and retry what is temporary.

        ``path`` is a path on the registry or an absolute URL it handed out (an upload
        location). ``retry=False`` is for requests that change state on the server
        (a PATCH): whether to send them again is the caller's decision.
        """
        failures = 0
        while True:
            try:
                resp = self._request_once(method, path, repository, dict(headers or {}), stream, data)
            except (TransportError, RegistryError) as e:
                if not retry or not e.temporary:
                    raise
                failures += 1
                if failures >= self.retry.attempts:
                    raise
                self._sleep(e.retry_after if e.retry_after is not None else self._backoff(failures))
                continue
            return resp

    def _backoff(self, failures: int) -> float:
        return min(self.retry.max_backoff, self.retry.backoff * (2 ** (failures - 1)))

    def _request_once(
        self, method: str, path: str, repository: str | None, headers: dict[str, str], stream: bool,
        data: bytes | None = None,
    ) -> requests.Response:
        url = path if path.startswith(("http://", "https://")) else self.base + path
        auth = self._auth_header(repository)
        answered = False
        for _ in range(6):
            send_headers = dict(headers)
            on_registry = urlsplit(url).netloc.lower() == self.endpoint.lower()
            if auth and on_registry:
                send_headers["Authorization"] = auth
            resp = self._send(method, url, send_headers, stream, data)
            if resp.status_code == 401 and on_registry and not answered:
                resp.close()
                auth = self._answer_challenge(resp, repository, auth)
                answered = True
                continue
            if resp.status_code in _REDIRECTS and "Location" in resp.headers:
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                self.policy.check_redirect(self.endpoint, url)
                continue
            if resp.status_code == 401 and answered:
                resp.close()
                creds = self._credentials()
                who = f"user {creds.username!r}" if creds and creds.username else "the credentials"
                raise AuthError(f"{self.endpoint}: {who} rejected for {repository or path} (401)", status=401)
            if resp.status_code >= 400:
                self._raise_for(resp, path)
            return resp
        raise TransportError(f"{self.endpoint}: too many redirects for {path}")

    def _raise_for(self, resp: requests.Response, path: str) -> None:
        status = resp.status_code
        codes, message = _error_codes(resp) if resp.request.method != "HEAD" else ((), "")
        resp.close()
        detail = f" ({', '.join(codes)}{': ' + message if message else ''})" if codes else ""
        where = f"{self.endpoint}{urlsplit(path).path if '://' in path else path}"  # never an upload's _state
        if status == 401:
            raise AuthError(f"{where}: authentication failed (401){detail}", status, codes)
        if status == 403:
            raise AuthError(f"{where}: access denied (403){detail}", status, codes)
        if status == 404:
            raise NotFoundError(f"{where}: not found (404){detail}", status, codes)
        if status == 429 or status >= 500:
            delay = _retry_after(resp) if status == 429 else None
            raise RegistryError(f"{where}: registry answered {status}{detail}", status, codes, temporary=True,
                                retry_after=min(delay, self.retry.max_retry_after) if delay is not None else None)
        raise RegistryError(f"{where}: registry answered {status}{detail}", status, codes)

    # -- the API -------------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: reachable, speaks the API, and (if it says so) learn its auth."""
        self._request("GET", "/v2/", None).close()

    def get_manifest(self, repository: str, identifier: str, expected: Digest | None = None) -> FetchedManifest:
        """Fetch a manifest's exact bytes and verify them.

        The digest the registry claims (``Docker-Content-Digest``) and the digest we asked
        for (``expected``) must both match the bytes; a manifest larger than the cap is
        refused before it is read in full.
        """
        failures = 0
        while True:  # a connection dropped mid-body is retried like one dropped before it
            resp = self._request("GET", f"/v2/{repository}/manifests/{identifier}", repository,
                                 {"Accept": ACCEPT}, stream=True)
            try:
                with resp:
                    length = resp.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                        raise UnsupportedError(f"{repository}:{identifier}: manifest of {length} bytes exceeds "
                                               f"the {MAX_MANIFEST_SIZE}-byte cap")
                    raw = self._read_limited(resp, MAX_MANIFEST_SIZE, f"{repository}:{identifier}")
                    if length and length.isdigit() and int(length) != len(raw):
                        raise TransportError(f"{self.endpoint}: manifest {repository}:{identifier} truncated "
                                             f"({len(raw)} of {length} bytes)")
                    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
                    claimed = resp.headers.get("Docker-Content-Digest")
                break
            except TransportError:
                failures += 1
                if failures >= self.retry.attempts:
                    raise
                self._sleep(self._backoff(failures))
        what = f"manifest {repository}@{identifier}"
        if claimed:
            try:
                claimed_digest = Digest.parse(claimed.strip())
            except Exception:
                raise DigestMismatchError(f"{what}: registry sent an invalid Docker-Content-Digest") from None
            actual = Digest.of(raw, claimed_digest.algorithm)
            if actual != claimed_digest:
                raise DigestMismatchError(f"{what}: digest mismatch: registry claims {claimed_digest}, "
                                          f"bytes hash to {actual}")
        digest = Digest.of(raw, expected.algorithm if expected else "sha256")
        if expected and digest != expected:
            raise DigestMismatchError(f"{what}: digest mismatch: expected {expected}, got {digest}")
        return FetchedManifest(raw, digest, media_type)

    def _read_limited(self, resp: requests.Response, limit: int, what: str) -> bytes:
        parts: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(65536):
                total += len(chunk)
                if total > limit:
                    raise UnsupportedError(f"{what}: manifest exceeds the {limit}-byte cap")
                parts.append(chunk)
        except requests.exceptions.RequestException as e:
            raise TransportError(f"{self.endpoint}: connection lost reading {what}: {type(e).__name__}") from None
        return b"".join(parts)

    def fetch_blob(
        self, repository: str, digest: Digest, size: int, sink: BlobSink,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a blob into ``sink``, resuming with Range after a dropped connection.

        The sink hashes; this method only guarantees that exactly ``size`` bytes were
        delivered in order. A server that ignores Range makes the sink start over.
        """
        failures = 0
        while True:
            start = sink.offset
            try:
                self._stream_blob(repository, digest, size, sink, on_bytes)
                return
            except TransportError:
                if sink.offset > start:
                    failures = 0  # progress was made: the next failure starts a fresh count
                failures += 1
                if failures >= self.retry.attempts:
                    raise
                self._sleep(self._backoff(failures))

    def _stream_blob(self, repository: str, digest: Digest, size: int, sink: BlobSink,
                     on_bytes: Callable[[int], None] | None) -> None:
        if sink.offset >= size:
            return  # already complete (an earlier run stopped before commit): a Range would get 416
        headers = {"Range": f"bytes={sink.offset}-"} if sink.offset else {}
        path = f"/v2/{repository}/blobs/{digest}"
        resp = self._request("GET", path, repository, headers, stream=True)
        with resp:
            if sink.offset and resp.status_code != 206:
                if on_bytes:
                    on_bytes(-sink.offset)
                sink.reset()
            elif resp.status_code == 206 and not resp.headers.get("Content-Range", "").startswith(
                    f"bytes {sink.offset}-"):
                if on_bytes:
                    on_bytes(-sink.offset)
                sink.reset()
                raise TransportError(f"{self.endpoint}: blob {digest.short} resumed at the wrong offset")
            raw = resp.raw
            # Whole CHUNKs are read with read(), which fills them in C: fast, but a
            # connection that stalls or dies mid-chunk loses that chunk's bytes, so a
            # resume refetches at most CHUNK. A tail shorter than CHUNK (and so any small
            # blob) is read with read1, which hands over what has arrived: nothing is lost.
            # read1 costs a Python call per TLS record, too slow for the bulk of a layer.
            read1 = getattr(raw, "read1", None) or raw.read

            def receive(n: int) -> bytes:
                try:
                    return raw.read(n, decode_content=False) if n >= CHUNK else read1(n, decode_content=False)
                except (urllib3.exceptions.HTTPError, OSError, requests.exceptions.RequestException) as e:
                    raise TransportError(f"{self.endpoint}: connection lost during blob {digest.short} at "
                                         f"{sink.offset} of {size} bytes ({type(e).__name__})") from None

            while sink.offset < size:
                chunk = receive(min(CHUNK, size - sink.offset))
                if not chunk:
                    break
                sink.write(chunk)  # an OSError here is the local disk's (full?): the store reports it
                if on_bytes:
                    on_bytes(len(chunk))
            if sink.offset == size and receive(1):
                raise DigestMismatchError(f"blob {digest}: registry sent more than the {size} bytes "
                                          "its descriptor declares")
        if sink.offset < size:
            raise TransportError(f"{self.endpoint}: blob {digest.short} truncated at {sink.offset} of {size} bytes")

    def blob_size(self, repository: str, digest: Digest) -> int:
        """HEAD a blob: its size, from Content-Length (NotFoundError if absent)."""
        resp = self._request("HEAD", f"/v2/{repository}/blobs/{digest}", repository)
        resp.close()
        length = resp.headers.get("Content-Length", "")
        if not length.isdigit():
            raise RegistryError(f"{self.endpoint}: no Content-Length for blob {digest.short}")
        return int(length)

    # -- pushing -------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: Digest) -> bool:
        """HEAD a blob: True when the registry holds it (a push skips it then)."""
        try:
            self._request("HEAD", f"/v2/{repository}/blobs/{digest}", repository).close()
        except NotFoundError:
            return False
        return True

    def _location(self, resp: requests.Response, what: str) -> str:
        """The absolute upload URL a registry answered with."""
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.endpoint}: {what} answered {resp.status_code} without a Location")
        return urljoin(resp.url or self.base, location)

    def _start_upload(self, repository: str) -> str:
        """POST a new upload session; its URL."""
        resp = self._request("POST", f"/v2/{repository}/blobs/uploads/", repository)
        resp.close()
        if resp.status_code != 202:
            raise RegistryError(f"{self.endpoint}: starting an upload to {repository} answered {resp.status_code}",
                                resp.status_code)
        return self._location(resp, "starting an upload")

    @staticmethod
    def _with_digest(location: str, digest: Digest) -> str:
        parts = urlsplit(location)
        query = f"{parts.query}&" if parts.query else ""
        return parts._replace(query=query + urlencode({"digest": str(digest)})).geturl()

    def _finish_upload(self, repository: str, location: str, digest: Digest, data: bytes | None) -> None:
        """PUT ``?digest=`` (with the last bytes, or none): the registry checks the digest
        and the blob exists from then on."""
        resp = self._request("PUT", self._with_digest(location, digest), repository,
                             {"Content-Type": "application/octet-stream"}, data=data if data is not None else b"",
                             retry=False)
        resp.close()
        if resp.status_code not in (201, 204):
            raise RegistryError(f"{self.endpoint}: completing blob {digest.short} answered {resp.status_code}",
                                resp.status_code)
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed.strip() != str(digest):
            raise DigestMismatchError(f"{self.endpoint}: blob {digest.short} was stored as {claimed}")

    def upload_blob(self, repository: str, digest: Digest, data: bytes) -> None:
        """A monolithic upload (POST, then PUT with the bytes): for blobs small enough
        that sending them again costs less than a round trip per chunk."""
        failures = 0
        lost = False
        while True:
            try:
                if lost and self.blob_exists(repository, digest):
                    return  # the PUT landed; only its answer was lost
                self._finish_upload(repository, self._start_upload(repository), digest, data)
                return
            except (TransportError, RegistryError) as e:
                if not _recoverable(e):
                    raise
                failures += 1
                if failures >= self.retry.attempts:
                    raise
                lost = True
                self._sleep(self._backoff(failures))

    def upload_status(self, location: str, repository: str) -> tuple[str, int]:
        """Where an upload session stands: its (fresh) URL and how many bytes it holds.

        The registry answers ``Range: 0-N`` for N+1 bytes; registry:2 also answers
        ``0-0`` for an empty session, so ``0-0`` is read as 0 and a PATCH at 0 that
        the registry refuses (416) starts a new session instead.
        """
        resp = self._request("GET", location, repository)
        resp.close()
        text = resp.headers.get("Range", "").strip()
        start, sep, end = text.removeprefix("bytes=").partition("-")
        if not 200 <= resp.status_code < 300 or not sep or start != "0" or not end.isdigit():
            raise RegistryError(f"{self.endpoint}: upload status answered {resp.status_code} with Range {text!r}",
                                resp.status_code)
        offset = int(end) + 1 if int(end) > 0 else 0
        return self._location(resp, "upload status") if resp.headers.get("Location") else location, offset

    def upload_blob_chunked(
        self, repository: str, digest: Digest, size: int, read: Callable[[int, int], bytes],
        chunk_size: int = UPLOAD_CHUNK, on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """Upload ``size`` bytes (``read(offset, n)`` supplies them) in PATCH chunks.

        After a dropped connection or a temporary error, the registry is asked where
        the session stands and the upload goes on from that offset; a session the
        registry no longer knows, or one whose bytes it rejected at the end, is
        replaced by a new one for this blob. Gives up after ``retry.attempts``
        failures in a row without reaching further into the blob than before.
        Returns the bytes sent (resends included). ``on_bytes`` hears each chunk
        accepted, and a negative count when a session is abandoned."""
        sent = failures = offset = reached = 0
        location: str | None = None
        failed: Exception | None = None  # the last failure, until recovered from
        finishing = False
        while True:
            try:
                if failed is not None:
                    if finishing and self.blob_exists(repository, digest):
                        return sent  # the final PUT landed; only its answer was lost
                    before = offset
                    location, offset = self._resume_point(repository, location, failed)
                    failed = None
                    if on_bytes and offset != before:
                        on_bytes(offset - before)
                    log.info("%s: upload of %s goes on at %d of %d bytes", self.endpoint, digest.short, offset, size)
                if location is None:
                    location = self._start_upload(repository)
                finishing = False
                while offset < size:
                    n = min(chunk_size, size - offset)
                    data = read(offset, n)
                    if len(data) != n:
                        raise StoreError(f"blob {digest.short}: the source ended at {offset + len(data)} of "
                                         f"{size} bytes")
                    sent += n
                    resp = self._request("PATCH", location, repository, {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    }, data=data, retry=False)
                    resp.close()
                    if resp.status_code != 202:
                        raise RegistryError(f"{self.endpoint}: PATCH of blob {digest.short} answered "
                                            f"{resp.status_code}", resp.status_code, temporary=True)
                    location = self._location(resp, "PATCH")
                    offset += n
                    if offset > reached:  # new ground, not bytes sent again after a restart
                        reached, failures = offset, 0
                    if on_bytes:
                        on_bytes(n)
                finishing = True
                self._finish_upload(repository, location, digest, None)
                return sent
            except (TransportError, RegistryError, DigestMismatchError) as e:
                if not _recoverable(e):
                    raise
                failures += 1
                if failures >= self.retry.attempts:
                    raise
                failed = failed or e
                self._sleep(self._backoff(failures))

    def _resume_point(self, repository: str, location: str | None, error: Exception) -> tuple[str, int]:
        """Where to go on after a failure: the session's own offset if the registry still
        has it, else a new session from 0."""
        rejected = isinstance(error, DigestMismatchError) or (
            isinstance(error, RegistryError) and error.status in (400, 416))
        if location is not None and not rejected:
            try:
                return self.upload_status(location, repository)
            except NotFoundError:
                pass  # the registry forgot or cancelled the session
            except RegistryError as e:
                if isinstance(e, AuthError) or e.temporary:
                    raise
        return self._start_upload(repository), 0

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        """PUT a manifest's exact bytes under a tag (or digest); the digest the registry
        stored it under must be the digest of those bytes."""
        digest = Digest.of(raw)
        resp = self._request("PUT", f"/v2/{repository}/manifests/{reference}", repository,
                             {"Content-Type": media_type}, data=raw)
        resp.close()
        if resp.status_code not in (200, 201, 204):
            raise RegistryError(f"{self.endpoint}: PUT manifest {repository}:{reference} answered {resp.status_code}",
                                resp.status_code)
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed.strip() != str(digest):
            raise DigestMismatchError(f"{self.endpoint}: manifest {repository}:{reference} was stored as {claimed}, "
                                      f"its bytes hash to {digest}")
        return digest


def _recoverable(error: Exception) -> bool:
    """Whether an upload may go on after ``error``: a dropped connection, a temporary
    answer, or the registry refusing the session's state (unknown session, wrong
    range, bytes that did not hash to the digest) - never TLS or auth."""
    if isinstance(error, TLSError | AuthError):
        return False
    if isinstance(error, TransportError | DigestMismatchError):
        return True
    return isinstance(error, RegistryError) and (error.temporary or error.status in (400, 404, 416))
