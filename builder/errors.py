"""The exception tree of imc.

Every error a user can meet is an ``ImcError``; the CLI prints its message on one
line and exits with its ``exit_code``, one of ``ExitCode`` (the README's table is this
enum, and a test holds them equal). Library errors from requests, ssl or the OS are
translated once, where they happen (the transport, the store), and never leak out.

    ImcError
    ├── ValidationError          bad input: a field, a flag, a YAML document
    │   ├── BadReferenceError    a malformed image reference or digest
    │   └── AlreadyExistsError   a name already taken by another cache
    ├── DigestMismatchError      bytes that do not hash to the digest they claim
    ├── RegistryError            the registry answered with an error (status, codes)
    │   ├── AuthError            401/403, or credentials we could not use
    │   ├── NotFoundError        manifest, blob, tag or repository unknown
    │   └── UnsupportedError     a manifest type or media type imc does not handle
    ├── TransportError           no answer: refused, reset, timeout, truncated body
    │   ├── TLSError             certificate verification or handshake failed
    │   └── DeadlineError        the command's time (--timeout) ran out
    ├── StoreError               the content store is damaged or cannot be written
    ├── NotFoundLocalError       a digest, image or record that imc does not hold
    │   └── CacheDeletedError    the cache being built was deleted under its build
    ├── CacheStateError          an operation the cache's phase does not allow
    ├── QuotaError               too many caches of a kind
    ├── CapacityError            the images do not fit the volume's size
    ├── BuildFailedError         ``--wait``: the build ended Failed or UpdateFailed
    └── NoMatchError             ``imc match``: no cache fits and auto-match is off
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit status of ``imc``, as the README's table lists them."""

    OK = 0  # success
    ERROR = 1  # other error
    USAGE = 2  # bad input: a flag, a reference, a file, a name already taken
    REGISTRY = 3  # the registry could not be reached or answered an error
    DIGEST = 4  # a digest mismatch: content did not verify
    AUTH = 5  # authentication failed
    NOT_FOUND = 6  # not found (in the registry or locally)
    UNSUPPORTED = 7  # unsupported content (schema 1, unknown manifest type)
    STORE = 8  # the local store cannot be read or written
    PHASE = 9  # the cache's phase does not allow the operation
    QUOTA = 10  # a cache quota is exhausted
    CAPACITY = 11  # the images do not fit the cache size
    BUILD_FAILED = 12  # `--wait`: the build ended Failed or UpdateFailed
    NO_MATCH = 13  # `imc match`: no cache matches
    INTERRUPTED = 130  # interrupted (Ctrl-C)


class ImcError(Exception):
    """Base of every error imc reports to a user."""

    exit_code: int = ExitCode.ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(ImcError):
    """Input that breaks a rule; nothing was changed."""

    exit_code = ExitCode.USAGE


class BadReferenceError(ValidationError):
    """An image reference or digest that does not follow the grammar."""


class AlreadyExistsError(ValidationError):
    """A cache name that another cache already has; nothing was changed."""


class DigestMismatchError(ImcError):
    """Content whose hash or size differs from what its descriptor promised."""

    exit_code = ExitCode.DIGEST


class RegistryError(ImcError):
    """An error answer from a registry, with the spec's error codes when it sent them.

    ``temporary`` tells the retry loop whether asking again may help.
    """

    exit_code = ExitCode.REGISTRY

    def __init__(
        self,
        message: str,
        status: int | None = None,
        codes: tuple[str, ...] = (),
        temporary: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
        self.temporary = temporary
        self.retry_after = retry_after


class AuthError(RegistryError):
    """The registry refused our credentials, or wanted some we do not have."""

    exit_code = ExitCode.AUTH


class NotFoundError(RegistryError):
    """The registry does not hold the manifest, blob, tag or repository asked for."""

    exit_code = ExitCode.NOT_FOUND


class UnsupportedError(RegistryError):
    """Content that imc deliberately does not handle (schema 1, unknown media types)."""

    exit_code = ExitCode.UNSUPPORTED


class TransportError(ImcError):
    """The exchange with a registry failed below HTTP: refused, reset, timed out, cut.

    Temporary unless said otherwise: asking again may find the connection working.
    """

    exit_code = ExitCode.REGISTRY
    retry_after: float | None = None

    def __init__(self, message: str, temporary: bool = True) -> None:
        super().__init__(message)
        self.temporary = temporary


class ConnectError(TransportError):
    """No exchange could start: the host refused or could not be resolved, connecting
    timed out, or the connection ended before any answer. The host is unreachable, not
    merely slow; ``imc serve --pull-through`` backs off from it for a while."""


class TLSError(TransportError):
    """TLS failed: an unverifiable certificate or a broken handshake (never temporary)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=False)


class DeadlineError(TransportError):
    """The command's overall deadline passed before the registry was done (never temporary)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=False)


class StoreError(ImcError):
    """The local content store cannot be read or written as it must be."""

    exit_code = ExitCode.STORE


class NotFoundLocalError(ImcError):
    """A digest, image or cache record that imc does not hold locally."""

    exit_code = ExitCode.NOT_FOUND


class CacheDeletedError(NotFoundLocalError):
    """The cache being built was deleted under its build: nothing is left to record to."""


class CacheStateError(ImcError):
    """An operation that the cache's current phase does not allow."""

    exit_code = ExitCode.PHASE


class QuotaError(ImcError):
    """Creating one more cache of a kind would exceed its quota."""

    exit_code = ExitCode.QUOTA


class CapacityError(ImcError):
    """The images' unpacked size does not fit the cache's volume size."""

    exit_code = ExitCode.CAPACITY


class BuildFailedError(ImcError):
    """A build that ended Failed or UpdateFailed, reported by ``--wait``."""

    exit_code = ExitCode.BUILD_FAILED


class NoMatchError(ImcError):
    """No Ready cache fits the request and auto-match is off: the container would pull
    everything from the registry, which scripts want to tell apart from a failure."""

    exit_code = ExitCode.NO_MATCH
