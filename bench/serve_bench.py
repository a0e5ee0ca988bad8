"""Serving benchmarks: ``imc serve`` against registry:2, and the headline.

- Throughput: ``skopeo copy`` of the large fixture from ``imc serve`` (a Ready cache)
  against the same copy straight from registry:2, in one run.
- Stale serving: ``skopeo copy`` of the large fixture through ``imc serve
  --pull-through`` with its upstream registry stopped (served stale from what the
  pull-through stored), against the same copy from a Ready cache.
- Headline: time until the image is local (``skopeo copy`` into a directory, as a
  runtime would store it) on a cache hit, against a pull from an upstream registry
  behind a 100 Mbit/s link: a network namespace with a veth pair and a ``tbf``
  qdisc, made here and removed after.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import regfix
from harness import IMC, Table, fresh_dir, mb, run_measured, side_by_side

ROUNDS = 3
LARGE = "fixtures/large:1.0"
NETNS = "imc-bench-up"
HOST_IF, NS_IF = "imcb-host", "imcb-ns"
HOST_IP, NS_IP = "10.213.77.1", "10.213.77.2"


def _image_bytes(catalogue: dict[str, Any], ref: str) -> int:
    manifest = catalogue["images"][ref]["manifests"][0]
    return manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])


@contextlib.contextmanager
def imc_serve(home: Path, *args: str) -> Iterator[str]:
    """``imc serve ARGS`` in its own process on a free loopback port; yields host:port."""
    proc = subprocess.Popen([*IMC, "--home", str(home), "serve", "--listen", "127.0.0.1:0", "--sweep-interval", "0",
                             "--log-level", "warning", *args],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        line = proc.stderr.readline() if ready else ""
        if "serving on http://" not in line:
            raise RuntimeError(f"imc serve did not start: {line!r}")
        yield line.split("http://", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(10)


def build_cache(home: Path, registry: str, ref: str) -> None:
    subprocess.run([*IMC, "--home", str(home), "cache", "create", "bench", "--wait", "-q", "--image",
                    f"{registry}/{ref}", "--plain-http", registry], check=True, capture_output=True)


def _copy(source: str, dest: Path) -> list[str]:
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{source}", f"dir:{dest}"]


def throughput(endpoints: dict[str, Any], catalogue: dict[str, Any], work: Path, table: Table) -> None:
    registry = endpoints["plain"].host
    home = fresh_dir(work / "serve-home")
    build_cache(home, registry, LARGE)
    size = _image_bytes(catalogue, LARGE)
    dest = work / "serve-copy"
    with imc_serve(home) as serve:
        result = side_by_side(
            "serve", ROUNDS,
            imc=lambda: run_measured(_copy(f"{serve}/{LARGE}", dest)),
            peer=lambda: run_measured(_copy(f"{registry}/{LARGE}", dest)),
            reset=lambda: shutil.rmtree(dest, ignore_errors=True),
        )
    shutil.rmtree(dest, ignore_errors=True)
    table.add(f"skopeo copy of {mb(size)}: imc serve vs registry:2",
              f"{size / result.imc_median / 1e6:.0f} MB/s ({result.imc_median:.2f} s)",
              f"{size / result.peer_median / 1e6:.0f} MB/s ({result.peer_median:.2f} s)",
              f"**{result.peer_median / result.imc_median:.2f}x** throughput")


def stale_serve(storage: Path, catalogue: dict[str, Any], work: Path, table: Table) -> None:
    """The large image pulled through ``imc serve --pull-through`` from a registry:2 of
    its own (over the shared storage), which is then stopped: each later copy is served
    stale from the store. The peer is the same copy from a Ready cache (a hit)."""
    upstream = regfix.RegistrySet(work / "stale-upstream", modes=("plain",))
    upstream.storage = storage  # the fixtures already pushed: nothing to push again
    hit_home, stale_home = fresh_dir(work / "hit-home"), fresh_dir(work / "stale-home")
    dest = work / "stale-copy"
    size = _image_bytes(catalogue, LARGE)
    with upstream:
        registry = upstream.endpoints["plain"].host
        build_cache(hit_home, registry, LARGE)
        with imc_serve(hit_home) as hit, imc_serve(stale_home, "--pull-through", "--upstream", registry,
                                                    "--plain-http", registry) as stale:
            run_measured(_copy(f"{stale}/{LARGE}", dest))  # pull-through stores it while the upstream is up
            upstream.kill("plain")
            result = side_by_side(
                "stale", ROUNDS,
                imc=lambda: run_measured(_copy(f"{stale}/{LARGE}", dest)),
                peer=lambda: run_measured(_copy(f"{hit}/{LARGE}", dest)),
                reset=lambda: shutil.rmtree(dest, ignore_errors=True),
            )
    shutil.rmtree(dest, ignore_errors=True)
    table.add(f"skopeo copy of {mb(size)}, upstream stopped: stale pull-through vs cache hit",
              f"{result.imc_median:.2f} s", f"{result.peer_median:.2f} s",
              f"**{result.imc_median / result.peer_median:.2f}x** time (target ≤ 1.5x)")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def shaped_registry(storage: Path, work: Path, rate: str = "100mbit") -> Iterator[str]:
    """registry:2 in a network namespace, reached over a veth pair shaped to ``rate``."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
    config = work / "shaped-registry.yml"
    config.write_text(f"""version: 0.1
log: {{level: error, accesslog: {{disabled: true}}}}
storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}},
          maintenance: {{uploadpurging: {{enabled: false}}}}}}
http: {{addr: "{NS_IP}:5000", secret: bench}}
health: {{storagedriver: {{enabled: false}}}}
""")
    proc = None
    try:
        _sh("ip", "netns", "add", NETNS)
        _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _sh("ip", "link", "set", NS_IF, "netns", NETNS)
        _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        _sh("ip", "link", "set", HOST_IF, "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", NS_IF, "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        for ns, dev in ((("ip", "netns", "exec", NETNS), NS_IF), ((), HOST_IF)):
            _sh(*ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms")
        proc = subprocess.Popen(["ip", "netns", "exec", NETNS, regfix.registry_bin(), "serve", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"{NS_IP}:5000"
        deadline = time.monotonic() + 15
        while subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{endpoint}/{LARGE}"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the shaped registry did not come up")
            time.sleep(0.2)  # polling the registry until it answers, with a deadline
        yield endpoint
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)


def headline(storage: Path, catalogue: dict[str, Any], work: Path, table: Table) -> None:
    size = _image_bytes(catalogue, LARGE)
    home = work / "serve-home"  # the cache built by throughput()
    dest = work / "headline-copy"
    try:
        with shaped_registry(storage, work) as upstream:
            shutil.rmtree(dest, ignore_errors=True)
            cold = run_measured(_copy(f"{upstream}/{LARGE}", dest))
    except (subprocess.CalledProcessError, RuntimeError, FileNotFoundError) as e:
        table.add("headline: cache hit vs 100 Mbit/s upstream", "not run", "not run",
                  f"network namespace unavailable ({type(e).__name__})")
        return
    hits = []
    with imc_serve(home) as serve:
        for _ in range(ROUNDS):
            shutil.rmtree(dest, ignore_errors=True)
            hits.append(run_measured(_copy(f"{serve}/{LARGE}", dest)).seconds)
    shutil.rmtree(dest, ignore_errors=True)
    hit = sorted(hits)[len(hits) // 2]
    table.add(f"headline: {mb(size)} image local, cache hit vs pull over 100 Mbit/s",
              f"{hit:.2f} s (cache hit via imc serve)", f"{cold.seconds:.1f} s (registry:2 upstream)",
              f"**{cold.seconds / hit:.0f}x** faster (the original claims 10x)")
