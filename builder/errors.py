"""The exception tree of imc.

Every error a user can meet is an ``ImcError``; the CLI prints its message on one
line and exits with its ``exit_code``. Library errors from requests, ssl or the OS are
translated once, where they happen (the transport, the store), and never leak out.

    ImcError
    ├── ValidationError          bad input: a field, a flag, a YAML document
    │   └── BadReferenceError    a malformed image reference or digest
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
    ├── CacheStateError          an operation the cache's phase does not allow
    ├── QuotaError               too many caches of a kind
    └── CapacityError            the images do not fit the volume's size
"""

from __future__ import annotations


class ImcError(Exception):
    """Base of every error imc reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(ImcError):
    """Input that breaks a rule; nothing was changed."""

    exit_code = 2


class BadReferenceError(ValidationError):
    """An image reference or digest that does not follow the grammar."""


class DigestMismatchError(ImcError):
    """Content whose hash or size differs from what its descriptor promised."""

    exit_code = 4


class RegistryError(ImcError):
    """An error answer from a registry, with the spec's error codes when it sent them.

    ``temporary`` tells the retry loop whether asking again may help.
    """

    exit_code = 3

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

    exit_code = 5


class NotFoundError(RegistryError):
    """The registry does not hold the manifest, blob, tag or repository asked for."""

    exit_code = 6


class UnsupportedError(RegistryError):
    """Content that imc deliberately does not handle (schema 1, unknown media types)."""

    exit_code = 7


class TransportError(ImcError):
    """The exchange with a registry failed below HTTP: refused, reset, timed out, cut.

    Temporary unless said otherwise: asking again may find the connection working.
    """

    exit_code = 3
    retry_after: float | None = None

    def __init__(self, message: str, temporary: bool = True) -> None:
        super().__init__(message)
        self.temporary = temporary


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

    exit_code = 8


class NotFoundLocalError(ImcError):
    """A digest, image or cache record that imc does not hold locally."""

    exit_code = 6


class CacheStateError(ImcError):
    """An operation that the cache's current phase does not allow."""

    exit_code = 9


class QuotaError(ImcError):
    """Creating one more cache of a kind would exceed its quota."""

    exit_code = 10


class CapacityError(ImcError):
    """The images' unpacked size does not fit the cache's volume size."""

    exit_code = 11
