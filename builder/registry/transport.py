"""The HTTP exchange with one registry endpoint: sessions, auth, redirects, errors.

The operations (manifests, blobs, uploads) never see requests or ssl. They ask the
``RegistryTransport`` to ``send`` one request, which answers auth challenges (basic,
or bearer tokens from the challenge's realm), follows redirects by hand so that
credentials never leave the registry's host, and turns error answers and library
exceptions into imc's errors; ``request`` does the same under the ``Retrier``. The
library exceptions are translated by their type (the table ``_TRANSLATIONS``, as
httpx maps them in its default transport), never by reading their text.
"""

from __future__ import annotations

import email.utils
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import requests.adapters
import urllib3

from builder import __version__
from builder.errors import AuthError, ConnectError, NotFoundError, RegistryError, TLSError, TransportError
from builder.registry.auth import Challenge, Credentials, Keychain, TokenCache, parse_challenges
from builder.registry.hosts import HostPolicy, Transport
from builder.registry.retry import Retrier, RetryPolicy

# Skipping verification is the user's explicit choice (--insecure), not news to warn of.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

USER_AGENT = f"imc/{__version__}"
_REDIRECTS = {301, 302, 303, 307, 308}
READ_ERRORS = (urllib3.exceptions.HTTPError, OSError, requests.exceptions.RequestException)
"""What reading a response body may raise: the connection broke or went silent."""


# -- library errors, by type ----------------------------------------------------------


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps: requests wraps urllib3's errors (in ``args`` and
    ``reason``), which wrap the socket's or ssl's (as ``__cause__``/``__context__``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        reason = getattr(e, "reason", None)
        todo += [a for a in e.args if isinstance(a, BaseException)]
        todo += [reason if isinstance(reason, BaseException) else None, e.__cause__, e.__context__]
    return seen


def _tls(host: str, e: BaseException, hint: str) -> TransportError:
    if getattr(e, "reason", None) == "WRONG_VERSION_NUMBER":
        return TLSError(f"{host} does not speak TLS; if it is a plain HTTP registry, list it with --plain-http {host}")
    return TLSError(f"TLS error talking to {host}: TLS handshake failed{hint}")


_TRANSLATIONS: tuple[tuple[type[BaseException], Callable[[str, BaseException, str], TransportError]], ...] = (
    (ssl.SSLCertVerificationError,
     lambda host, e, hint: TLSError(f"TLS error talking to {host}: certificate verify failed{hint}")),
    (ssl.SSLError, _tls),
    (requests.exceptions.SSLError, _tls),
    # A name that does not resolve will not start to on a retry.
    (socket.gaierror, lambda host, e, hint: ConnectError(f"cannot resolve registry host {host}", temporary=False)),
    (ConnectionRefusedError, lambda host, e, hint: ConnectError(f"cannot connect to {host}: connection refused")),
    (urllib3.exceptions.ConnectTimeoutError,
     lambda host, e, hint: ConnectError(f"cannot connect to {host}: connection timed out")),
    (TimeoutError, lambda host, e, hint: TransportError(f"{host} did not answer in time (read timeout)")),
    (urllib3.exceptions.ReadTimeoutError,
     lambda host, e, hint: TransportError(f"{host} did not answer in time (read timeout)")),
)


def translate(error: requests.exceptions.RequestException, host: str, hint: str = "") -> TransportError:
    """imc's error for a library exception raised while sending a request to ``host``."""
    causes = _causes(error)
    for kind, make in _TRANSLATIONS:
        cause = next((c for c in causes if isinstance(c, kind)), None)
        if cause is not None:
            return make(host, cause, hint)
    if isinstance(error, requests.exceptions.ConnectionError):
        # Raised before any answer came (no route, reset or closed on connecting): a
        # body cut later is read elsewhere and is a TransportError.
        return ConnectError(f"connection to {host} failed: {type(error).__name__}")
    return TransportError(f"request to {host} failed: {type(error).__name__}")


# -- error answers -------------------------------------------------------------------


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


class RegistryTransport:
    """Requests to one registry endpoint (``host`` or ``host:port``), thread-safe."""

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
        self.retrier = Retrier(retry or RetryPolicy(), sleep)
        self.base = self.policy.base_url(endpoint)
        self._local = threading.local()
        self._challenge: Challenge | None = None
        self._creds: dict[str | None, Credentials | None] = {}
        self._lock = threading.Lock()

    # -- sending -------------------------------------------------------------------

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

    def tls_hint(self) -> str:
        """What to tell a user whose TLS failed: how to trust or skip this endpoint."""
        if self.policy.transport(self.endpoint) is Transport.HTTPS:
            return (f"; if {self.endpoint} uses a private CA pass --ca-file, or list it with "
                    f"--insecure {self.endpoint} (HTTPS without verification) or "
                    f"--plain-http {self.endpoint} (plain HTTP)")
        return ""

    def _exchange(self, method: str, url: str, headers: dict[str, str], timeout: tuple[float, float],
                  stream: bool = False, data: bytes | str | None = None) -> requests.Response:
        """One HTTP exchange, no redirects followed, library errors translated to ours."""
        host = urlsplit(url).netloc
        try:
            return self._session().request(
                method, url, headers=headers, stream=stream, allow_redirects=False, data=data,
                timeout=timeout, verify=self.policy.verify(host),
            )
        except requests.exceptions.RequestException as e:
            raise translate(e, host, self.tls_hint()) from None

    def request(
        self, method: str, path: str, repository: str | None, headers: dict[str, str] | None = None,
        stream: bool = False, data: bytes | None = None, retry: bool = True,
    ) -> requests.Response:
        """``send`` under the retrier. ``retry=False`` is for requests that change state
        on the server (a PATCH, the PUT that completes an upload): whether to send them
        again is the caller's decision."""
        if not retry:
            return self.send(method, path, repository, headers, stream, data)
        return self.retrier.run(lambda timeout: self.send(method, path, repository, headers, stream, data, timeout))

    def send(
        self, method: str, path: str, repository: str | None, headers: dict[str, str] | None = None,
        stream: bool = False, data: bytes | None = None, timeout: tuple[float, float] | None = None,
    ) -> requests.Response:
        """Send once with auth, following redirects safely; an error answer raises.

        ``path`` is a path on the registry or an absolute URL it handed out (an upload
        location). Credentials go only to the registry's own host.
        """
        timeout = timeout or self.retrier.policy.timeout
        url = path if path.startswith(("http://", "https://")) else self.base + path
        auth = self._auth_header(repository)
        answered = False
        for _ in range(6):
            send_headers = dict(headers or {})
            on_registry = urlsplit(url).netloc.lower() == self.endpoint.lower()
            if auth and on_registry:
                send_headers["Authorization"] = auth
            resp = self._exchange(method, url, send_headers, timeout, stream, data)
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
                creds = self._credentials(repository)
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
            raise RegistryError(f"{where}: registry answered {status}{detail}", status, codes, temporary=True,
                                retry_after=_retry_after(resp) if status == 429 else None)
        raise RegistryError(f"{where}: registry answered {status}{detail}", status, codes)

    def location(self, resp: requests.Response, what: str) -> str:
        """The absolute URL in a ``Location`` answer (an upload session's)."""
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.endpoint}: {what} answered {resp.status_code} without a Location")
        return urljoin(resp.url or self.base, location)

    # -- auth ----------------------------------------------------------------------

    def _credentials(self, repository: str | None) -> Credentials | None:
        """The credentials for ``repository`` here: a namespace's own entry may differ
        from the registry-wide one, so they are looked up (once) per repository."""
        with self._lock:
            if repository not in self._creds:
                self._creds[repository] = self.keychain.resolve(self.endpoint, repository)
            return self._creds[repository]

    def scope(self, repository: str) -> str:
        """The token scope this client asks for: pull, or pull and push."""
        return f"repository:{repository}:{'pull,push' if self.push else 'pull'}"

    def _token_key(self, challenge: Challenge, scope: str) -> tuple[str, str, str]:
        return (challenge.params.get("realm", ""), challenge.params.get("service", ""), scope)

    def _auth_header(self, repository: str | None) -> str | None:
        """What to send up front, from the challenge this registry already gave us."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials(repository)
            return creds.basic_header() if creds and creds.password else None
        if challenge.scheme == "bearer" and repository:
            token = self.tokens.get(self._token_key(challenge, self.scope(repository)))
            return f"Bearer {token}" if token else None
        return None

    def _answer_challenge(self, resp: requests.Response, repository: str | None, sent: str | None) -> str:
        """Learn from a 401 and return the Authorization to retry with."""
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        challenge = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if challenge is None:
            raise AuthError(f"{self.endpoint} requires authentication but sent no usable challenge", status=401)
        self._challenge = challenge
        if challenge.scheme == "basic":
            creds = self._credentials(repository)
            if not creds or not creds.password:
                raise AuthError(f"{self.endpoint} requires credentials: none found (--pull-secret, --authfile, "
                                "containers auth.json or docker config.json)", status=401)
            header = creds.basic_header()
            if sent == header:
                raise AuthError(f"{self.endpoint}: credentials for user {creds.username!r} were rejected (401)",
                                status=401)
            return header
        # Key tokens by our own scope string: registries vary the action order in theirs.
        scope = self.scope(repository) if repository else challenge.params.get("scope", "")
        key = self._token_key(challenge, scope)
        if sent is not None and sent.startswith("Bearer "):
            self.tokens.drop(key)  # expired, revoked, or insufficient_scope: ask again
        return f"Bearer {self._fetch_token(challenge, scope, repository)}"

    def _fetch_token(self, challenge: Challenge, scope: str, repository: str | None) -> str:
        """Ask the challenge's realm for a token for ``scope``."""
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"{self.endpoint} sent a bearer challenge without a usable realm")
        service = challenge.params.get("service", "")
        creds = self._credentials(repository)
        headers: dict[str, str] = {}
        if creds and creds.identity_token:
            body: str | None = urlencode({"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                                          "service": service, "scope": scope, "client_id": "imc"})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            method, url = "POST", realm
        else:
            if creds and creds.password:
                headers["Authorization"] = creds.basic_header()
            query = urlencode([("service", service), ("scope", scope)] if service else [("scope", scope)])
            body, method, url = None, "GET", f"{realm}{'&' if '?' in realm else '?'}{query}"
        try:
            resp = self._exchange(method, url, headers, self.retrier.policy.timeout, data=body)
        except TLSError:
            raise TLSError(f"TLS error talking to token service {urlsplit(url).netloc}{self.tls_hint()}") from None
        except TransportError as e:
            raise TransportError(f"token service {urlsplit(url).netloc} unreachable: {e.message}") from None
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
