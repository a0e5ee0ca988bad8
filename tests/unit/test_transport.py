"""The transport and the retrier on their own: library errors translated by type,
credentials kept on the registry's host, and when a retried operation stops.

The retrier runs on a fake clock: ``sleep`` advances it, so limits measured in
seconds are tested without waiting for them.
"""

from __future__ import annotations

import random
import socket
import ssl

import pytest
import requests
import urllib3
from support.faultserver import Redirect

from builder.errors import (
    AuthError,
    DeadlineError,
    DigestMismatchError,
    RegistryError,
    TLSError,
    TransportError,
)
from builder.registry.auth import DockerConfig, Keychain
from builder.registry.hosts import HostPolicy
from builder.registry.retry import Deadline, Retrier, RetryPolicy, backoff
from builder.registry.transport import RegistryTransport, translate


class Clock:
    """A monotonic clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def retrier(clock: Clock, **policy: object) -> Retrier:
    return Retrier(RetryPolicy(**policy), clock.sleep, clock)  # type: ignore[arg-type]


def failing(*errors: Exception, then: object = "done"):
    """An operation that raises ``errors`` in turn, then returns ``then``; it records
    the timeouts it was given."""
    queue = list(errors)
    seen: list[tuple[float, float]] = []

    def op(timeout: tuple[float, float]) -> object:
        seen.append(timeout)
        if queue:
            raise queue.pop(0)
        return then

    op.seen = seen  # type: ignore[attr-defined]
    return op


# -- library errors, by type --------------------------------------------------------------


def wrapped(cause: BaseException, outer: type[requests.exceptions.RequestException]
            = requests.exceptions.ConnectionError) -> requests.exceptions.RequestException:
    """``cause`` wrapped the way requests and urllib3 wrap a socket's error."""
    inner = urllib3.exceptions.NewConnectionError(None, "failed")  # type: ignore[arg-type]
    inner.__cause__ = cause
    return outer(urllib3.exceptions.MaxRetryError(None, "/v2/", inner))  # type: ignore[arg-type]


def test_refused_name_and_tls_causes_are_told_apart_by_type():
    refused = translate(wrapped(ConnectionRefusedError(111, "x")), "h:1")
    assert refused.message == "cannot connect to h:1: connection refused" and refused.temporary
    unresolved = translate(wrapped(socket.gaierror(-2, "x")), "h:1")
    assert unresolved.message == "cannot resolve registry host h:1" and not unresolved.temporary
    cert = translate(wrapped(ssl.SSLCertVerificationError(1, "x"), requests.exceptions.SSLError), "h:1", "; hint")
    assert isinstance(cert, TLSError) and cert.message == "TLS error talking to h:1: certificate verify failed; hint"


def test_the_text_of_an_error_does_not_decide_its_translation():
    lying = requests.exceptions.ConnectionError("Connection refused; Name or service not known; nodename")
    err = translate(lying, "h:1")
    assert err.message == "connection to h:1 failed: ConnectionError"
    assert err.temporary


def test_https_to_a_plain_http_server_says_it_does_not_speak_tls(server):
    transport = RegistryTransport(server.endpoint, HostPolicy())
    with pytest.raises(TLSError) as info:
        transport.send("GET", "/v2/", None)
    assert info.value.message.startswith(f"{server.endpoint} does not speak TLS")
    assert f"--plain-http {server.endpoint}" in info.value.message


def test_a_silent_server_is_a_read_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        transport = RegistryTransport(endpoint, HostPolicy(plain_http=frozenset({endpoint})))
        with pytest.raises(TransportError) as info:
            transport.send("GET", "/v2/", None, timeout=(5.0, 0.05))
    assert info.value.message == f"{endpoint} did not answer in time (read timeout)"
    assert info.value.temporary


# -- auth and redirects ------------------------------------------------------------------------


def test_credentials_stay_on_the_registry_host_across_a_redirect(server, other_server):
    blob = server.add_blob(b"payload")
    server.require_basic("u", "p")
    server.copy_blobs_to(other_server)
    server.always(server.blob_path(blob.digest), Redirect(other_server))
    policy = HostPolicy(plain_http=frozenset({server.endpoint, f"localhost:{other_server.port}"}))
    keychain = Keychain([DockerConfig(auths={server.endpoint: {"username": "u", "password": "p"}})],
                        use_docker_config=False)
    resp = RegistryTransport(server.endpoint, policy, keychain).request("GET", server.blob_path(blob.digest),
                                                                       server.repository)
    assert resp.content == b"payload"
    assert server.authorizations()[-1] is not None  # the registry got them
    assert other_server.authorizations() == [None]  # the redirect target never did


def test_a_rejected_password_is_an_auth_error_sent_once(server):
    server.require_basic("u", "right")
    keychain = Keychain([DockerConfig(auths={server.endpoint: {"username": "u", "password": "wrong"}})],
                        use_docker_config=False)
    transport = RegistryTransport(server.endpoint, HostPolicy(plain_http=frozenset({server.endpoint})), keychain)
    with pytest.raises(AuthError) as info:
        transport.request("GET", "/v2/", None)
    assert "'u'" in info.value.message and "wrong" not in info.value.message
    assert len(server.requests) == 2  # the challenge, then the one try with the password


# -- the retrier ---------------------------------------------------------------------------------


def test_temporary_errors_are_retried_until_the_attempts_run_out():
    clock = Clock()
    op = failing(*[TransportError("cut")] * 3)
    assert retrier(clock, attempts=4).run(op) == "done"
    with pytest.raises(TransportError):
        retrier(clock, attempts=3).run(failing(*[TransportError("cut")] * 3))


def test_errors_that_are_not_temporary_are_raised_at_once():
    clock = Clock()
    for error in (TLSError("bad cert"), RegistryError("400", 400), DigestMismatchError("bad bytes")):
        with pytest.raises(type(error)):
            retrier(clock).run(failing(error))
    assert clock.sleeps == []


def test_retry_after_is_honoured_up_to_its_cap():
    clock = Clock()
    retrier(clock, max_retry_after=5.0).run(failing(
        RegistryError("429", 429, temporary=True, retry_after=3.0),
        RegistryError("429", 429, temporary=True, retry_after=3600.0)))
    assert clock.sleeps == [3.0, 5.0]


def test_progress_resets_the_count_of_failures():
    clock = Clock()
    held = [0]

    def op(timeout: tuple[float, float]) -> str:
        if held[0] < 10:
            held[0] += 1  # each try gets a little further, then breaks
            raise TransportError("cut")
        return "done"

    assert retrier(clock, attempts=2).run(op, progress=lambda: held[0]) == "done"
    assert len(clock.sleeps) == 10


def test_by_default_a_silent_registry_costs_at_most_two_minutes():
    clock = Clock()
    op = failing(*[TransportError("connection lost during blob")] * 100)

    def timing_out(timeout: tuple[float, float]) -> object:
        clock.now += timeout[1]  # the read timeout fires
        return op(timeout)

    with pytest.raises(TransportError) as info:
        Retrier(RetryPolicy(), clock.sleep, clock).run(timing_out, progress=lambda: 0)
    assert info.value.message == "connection lost during blob"
    reads = [t[1] for t in op.seen]  # type: ignore[attr-defined]
    assert reads[0] == 60.0 and reads[1] < 60.0  # the second try gets only what is left of the 120 s
    assert clock.now - 1000.0 <= 120.0 + 0.001


def test_the_deadline_ends_an_operation_that_keeps_progressing():
    clock = Clock()
    held = [0]

    def trickle(timeout: tuple[float, float]) -> object:
        held[0] += 1
        clock.now += timeout[1]
        raise TransportError("connection lost during blob")

    policy = RetryPolicy(timeout=(10.0, 2.0), stall=30.0, deadline=Deadline(clock.now + 60.0, 60.0))
    with pytest.raises(DeadlineError) as info:
        Retrier(policy, clock.sleep, clock).run(trickle, progress=lambda: held[0])
    assert "connection lost during blob" in info.value.message and "60 s deadline" in info.value.message
    assert not info.value.temporary
    assert held[0] > policy.attempts  # progress kept it going past the count of attempts
    assert clock.now <= 1000.0 + 60.0


def test_timeouts_never_reach_past_the_deadline():
    clock = Clock()
    op = failing()
    Retrier(RetryPolicy(timeout=(10.0, 60.0), deadline=Deadline(clock.now + 4.0, 4.0)), clock.sleep, clock).run(op)
    assert op.seen == [(4.0, 4.0)]  # type: ignore[attr-defined]
    clock.now += 5.0
    with pytest.raises(DeadlineError):
        Retrier(RetryPolicy(deadline=Deadline(clock.now - 1.0, 4.0)), clock.sleep, clock).run(failing())


def test_until_sets_a_deadline_from_now():
    assert RetryPolicy().until(None).deadline is None
    deadline = RetryPolicy().until(30.0).deadline
    assert deadline is not None and deadline.seconds == 30.0



def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    top = [backoff(n, 0.5, 10.0, lambda: 0.999999) for n in range(1, 8)]
    assert top == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0], rel=1e-5)
    assert [backoff(n, 0.5, 10.0, lambda: 0.0) for n in range(1, 8)] == [0.0] * 7
    assert backoff(3, 0.5, 10.0, lambda: 0.25) == 0.5


def test_a_fleet_failing_together_does_not_retry_in_lockstep():
    draws = [backoff(4, 0.5, 10.0, random.Random(seed).random) for seed in range(20)]
    assert all(0 <= d < 4.0 for d in draws)
    assert len(set(draws)) == 20  # twenty nodes, twenty different waits
