"""A registry that stops sending, or sends too slowly, costs a bounded wait.

What bounds a download is time without progress (``stall``) and the command's
deadline, not the number of retries: a download that keeps receiving bytes goes on.
The limits are scaled down (fractions of a second) through the retry policy, and
through the settings and ``--timeout`` for the CLI; nothing here asserts a duration.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.faultserver import FaultServer, Stall, Trickle

from builder.digest import Digest, hash_file
from builder.errors import DeadlineError, TransportError
from builder.pull import Puller
from builder.reference import parse
from builder.registry.hosts import HostPolicy
from builder.registry.retry import RetryPolicy
from builder.store import Store

IMC = [sys.executable, "-m", "builder"]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def release():
    """Frees the scripted server's stalled threads when the test ends."""
    event = threading.Event()
    yield event
    event.set()


def puller(srv: FaultServer, store: Store, retry: RetryPolicy) -> Puller:
    return Puller(store, HostPolicy(plain_http=frozenset({srv.endpoint})), retry=retry)


def partial_size(store: Store, digest: str) -> int | None:
    path = store.home.ingest_partial(Digest.parse(digest))
    return path.stat().st_size if path.exists() else None


def test_headers_then_silence_fails_at_the_stall_limit_and_keeps_the_bytes(tmp_path: Path, release) -> None:
    with FaultServer() as srv:
        image = srv.add_image([payload(100_000, 1)])
        victim = image.layers[0]
        path = srv.blob_path(victim.digest)
        srv.script(path, Stall(release, after=40_000))
        srv.always(path, Stall(release, after=0))  # every retry: headers, then nothing
        store = Store(tmp_path)
        # Many attempts allowed: what must stop the download is a second without a byte.
        retry = RetryPolicy(attempts=1000, backoff=0.01, timeout=(5.0, 0.2), stall=1.0)
        with pytest.raises(TransportError) as info:
            puller(srv, store, retry).pull([parse(f"{srv.reference}:v1")])
        tries = srv.count(path)
        assert not isinstance(info.value, DeadlineError)
        assert f"connection lost during blob {Digest.parse(victim.digest).short} at 40000 of" in info.value.message
        assert 2 <= tries < retry.attempts
        assert partial_size(store, victim.digest) == 40_000  # kept for the next try

        srv.always(path, None)
        release.set()
        puller(srv, store, retry).pull([parse(f"{srv.reference}:v1")])
        assert srv.ranges(path)[-1] == "bytes=40000-"
    assert store.blob_path(Digest.parse(victim.digest)).read_bytes() == victim.data


def test_a_trickle_slower_than_the_read_timeout_goes_on_until_the_deadline(tmp_path: Path, release) -> None:
    with FaultServer() as srv:
        image = srv.add_image([payload(50_000, 2)])
        victim = image.layers[0]
        path = srv.blob_path(victim.digest)
        srv.always(path, Trickle(release, every=0.5))  # a byte, then longer than the read timeout
        store = Store(tmp_path)
        retry = RetryPolicy(attempts=3, backoff=0.01, timeout=(5.0, 0.2), stall=30.0).until(2.0)
        with pytest.raises(DeadlineError) as info:
            puller(srv, store, retry).pull([parse(f"{srv.reference}:v1")])
        offsets = [int(r.removeprefix("bytes=").rstrip("-")) if r else 0 for r in srv.ranges(path)]
    assert "2 s deadline passed" in info.value.message
    assert info.value.exit_code == 3
    assert len(offsets) > retry.attempts  # every try made progress, so the count of attempts never ran out
    assert offsets == sorted(set(offsets))  # each try resumed further on
    assert partial_size(store, victim.digest) == offsets[-1] + 1


def test_a_stall_after_90_percent_resumes_from_the_kept_offset(tmp_path: Path, release) -> None:
    with FaultServer() as srv:
        data = payload(200_000, 3)
        image = srv.add_image([data])
        victim = image.layers[0]
        path = srv.blob_path(victim.digest)
        srv.script(path, Stall(release, after=180_000))
        store = Store(tmp_path)
        result = puller(srv, store, RetryPolicy(backoff=0.01, timeout=(5.0, 0.3), stall=10.0)).pull(
            [parse(f"{srv.reference}:v1")])
        ranges = srv.ranges(path)
    assert ranges == [None, "bytes=180000-"]
    assert result.blobs_fetched == 2
    digest, size = hash_file(str(store.blob_path(Digest.parse(victim.digest))))
    assert (str(digest), size) == (victim.digest, len(data))
    assert list(store.home.ingest.iterdir()) == []


def test_a_stall_inside_a_buffer_keeps_every_byte_received(tmp_path: Path, release) -> None:
    # Bytes are read into MiB buffers; a read that times out inside one hands over
    # what arrived, so the resume starts at the exact byte, not at a buffer boundary.
    with FaultServer() as srv:
        data = payload(5_000_000, 6)
        image = srv.add_image([data])
        victim = image.layers[0]
        path = srv.blob_path(victim.digest)
        srv.script(path, Stall(release, after=2_500_001))
        store = Store(tmp_path)
        puller(srv, store, RetryPolicy(backoff=0.01, timeout=(5.0, 0.3), stall=10.0)).pull(
            [parse(f"{srv.reference}:v1")])
        ranges = srv.ranges(path)
    assert ranges == [None, "bytes=2500001-"]
    assert store.blob_path(Digest.parse(victim.digest)).read_bytes() == data


def imc(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMC, "--home", str(home), *args], check=False, capture_output=True, text=True,
                          timeout=120)


def test_imc_pull_timeout_ends_a_trickle_with_exit_3(tmp_path: Path, release) -> None:
    with FaultServer() as srv:
        image = srv.add_image([payload(50_000, 4)])
        srv.always(srv.blob_path(image.layers[0].digest), Trickle(release, every=0.05))
        out = imc(tmp_path, "pull", "-q", "--plain-http", srv.endpoint, "--timeout", "1", f"{srv.reference}:v1")
    assert out.returncode == 3, out.stderr
    assert "1 s deadline passed" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_stall_setting_bounds_a_silent_registry_in_imc_pull(tmp_path: Path, release) -> None:
    assert imc(tmp_path, "config", "set", "pull_stall_seconds", "1").returncode == 0
    with FaultServer() as srv:
        image = srv.add_image([payload(50_000, 5)])
        path = srv.blob_path(image.layers[0].digest)
        srv.script(path, Stall(release, after=1000))
        srv.always(path, Stall(release, after=0))
        out = imc(tmp_path, "pull", "-q", "--plain-http", srv.endpoint, f"{srv.reference}:v1")
        tries = srv.count(path)
    assert out.returncode == 3, out.stderr
    assert "connection lost during blob" in out.stderr and "deadline" not in out.stderr
    assert tries >= 2  # progress on the first try earned a second


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    out = imc(tmp_path, "pull", "--timeout", "0", "example.com/app:1")
    assert out.returncode == 2
    assert "--timeout" in out.stderr
