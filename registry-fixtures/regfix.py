#!/usr/bin/env python3
"""Run real registry:2 (distribution 2.8) processes in four modes for imc's tests.

Modes, all serving ONE shared filesystem storage root (push once, read anywhere):

* ``plain``  HTTP, no auth.
* ``tls``    HTTPS with a throwaway CA (``trustme``); certificate for 127.0.0.1 and localhost.
* ``basic``  htpasswd (bcrypt) auth, user ``imc-user`` with a per-run password.
  Plain HTTP: distribution 2.8 does not require TLS for htpasswd auth.
* ``token``  bearer-token auth; ``token_issuer.py`` is the realm.  Plain HTTP.

Library use (``registry-fixtures`` on ``sys.path``)::

    rs = RegistrySet(workdir)
    endpoints = rs.start()          # {"plain": Endpoint, ...}
    catalogue = rs.push_fixtures()  # pushed through the plain endpoint
    ...
    rs.stop()

CLI::

    regfix.py up --state .run/registries.json [--large]   # detached; prints endpoints
    regfix.py down --state .run/registries.json
    regfix.py fixtures [--large]                          # generate only, into .fixtures-cache
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import bcrypt
import imagegen  # sibling module: registry-fixtures is sys.path[0] as a script, conftest adds it
import requests
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent

MODES = ("plain", "tls", "basic", "token")
TOKEN_ISSUER = "token-issuer"
USERNAME = "imc-user"
ISSUER_NAME = "imc-test-issuer"
SERVICE_NAME = "imc-test-registry"
REGISTRY_BIN_ENV = "IMC_REGISTRY_BIN"
# Debian and Ubuntu (package docker-registry) name the binary docker-registry; upstream
# distribution and Fedora (package docker-distribution) name it registry.
REGISTRY_BIN_NAMES = ("docker-registry", "registry")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
DEFAULT_RUN_DIR = imagegen.REPO_ROOT / ".run"


@dataclass
class Endpoint:
    """How a client reaches one running registry."""

    mode: str  # "plain" | "tls" | "basic" | "token"
    host: str  # "127.0.0.1:PORT", what a user types as the registry
    scheme: str  # "http" | "https"
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    token_url: str | None = None  # token issuer base URL (token mode), for /stats

    def url(self, path: str = "") -> str:
        """Absolute URL on this registry, e.g. ``url("/v2/")``."""
        return f"{self.scheme}://{self.host}{path}"

    @property
    def verify(self) -> str | bool:
        """Value for requests' ``verify=``: the CA file for https, else True."""
        return self.ca_file or True

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic credentials (for the registry in basic mode, the issuer in token mode)."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)


@dataclass
class _Process:
    """A child we started: enough to restart it identically or recognise it later."""

    name: str
    argv: list[str]
    log: Path
    ready_url: str
    verify: str | bool
    popen: subprocess.Popen[bytes] | None = None


def registry_bin() -> str:
    """The distribution (registry:2) binary: ``$IMC_REGISTRY_BIN``, else the first of
    ``docker-registry`` and ``registry`` on PATH.

    Looked up when the registries start, not hard-coded, so the fixtures run wherever a
    distribution registry is installed; when none is, the error says what to install.
    """
    configured = os.environ.get(REGISTRY_BIN_ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise RuntimeError(f"{REGISTRY_BIN_ENV}={configured} is not an executable file")
        return configured
    for name in REGISTRY_BIN_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no registry:2 binary: neither docker-registry nor registry is on PATH; install "
                       "docker-registry (Debian, Ubuntu) or docker-distribution (Fedora), or set "
                       f"{REGISTRY_BIN_ENV} to the binary")


def free_port() -> int:
    """A currently free loopback port (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RegistrySet:
    """Starts, supervises and stops the registries (and token issuer) for one test run.

    Every process is started in its own session so it survives the caller when
    used from the CLI; :meth:`stop` ends exactly the processes started here.
    """

    def __init__(self, workdir: Path, modes: tuple[str, ...] = MODES, token_expires_in: int = 300,
                 cache_dir: Path = imagegen.DEFAULT_CACHE_DIR) -> None:
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}")
        self.workdir = Path(workdir).resolve()
        self.modes = tuple(modes)
        self.token_expires_in = token_expires_in
        self.cache_dir = Path(cache_dir)
        self.storage = self.workdir / "storage"
        self.password = secrets.token_urlsafe(18)
        self.endpoints: dict[str, Endpoint] = {}
        self.catalogue: dict[str, Any] | None = None
        self.catalogue_path = self.workdir / "catalogue.json"
        self._procs: dict[str, _Process] = {}

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> dict[str, Endpoint]:
        """Start every mode, wait until each answers ``/v2/``; stop all on failure."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        try:
            binary = registry_bin()
            ca_file = self._make_tls() if "tls" in self.modes else None
            htpasswd = self._make_htpasswd() if {"basic", "token"} & set(self.modes) else None
            token_url = self._start_token_issuer(htpasswd) if "token" in self.modes else None
            for mode in self.modes:
                port = free_port()
                host = f"127.0.0.1:{port}"
                config = self._registry_config(mode, port, htpasswd, token_url)
                mode_dir = self.workdir / mode
                mode_dir.mkdir(exist_ok=True)
                config_path = mode_dir / "config.yml"
                config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                scheme = "https" if mode == "tls" else "http"
                endpoint = Endpoint(
                    mode=mode, host=host, scheme=scheme,
                    ca_file=str(ca_file) if mode == "tls" else None,
                    username=USERNAME if mode in ("basic", "token") else None,
                    password=self.password if mode in ("basic", "token") else None,
                    token_url=token_url if mode == "token" else None,
                )
                self._spawn(_Process(mode, [binary, "serve", str(config_path)], mode_dir / "registry.log",
                                     endpoint.url("/v2/"), endpoint.verify))
                self.endpoints[mode] = endpoint
        except BaseException:
            self.stop()
            raise
        return dict(self.endpoints)

    def stop(self) -> None:
        """Terminate (then kill if needed) and reap exactly the processes started here."""
        for proc in reversed(list(self._procs.values())):
            if proc.popen is None:
                continue
            if proc.popen.poll() is None:
                proc.popen.terminate()
                try:
                    proc.popen.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait(STOP_TIMEOUT)
            proc.popen = None

    def kill(self, name: str) -> None:
        """SIGKILL one registry (``mode``) or the ``token-issuer``, as a crash would."""
        proc = self._procs[name]
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(STOP_TIMEOUT)
        proc.popen = None

    def restart(self, name: str) -> None:
        """Start a killed (or running) process again with the same config and port."""
        self.kill(name)
        self._spawn(self._procs[name])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fixtures ---------------------------------------------------------------

    def push_fixtures(self, large: bool = False) -> dict[str, Any]:
        """Push the catalogue (plus ``fixtures/large:1.0`` if asked) once; all modes see it."""
        mode = "plain" if "plain" in self.endpoints else next(iter(self.endpoints))
        ep = self.endpoints[mode]
        self.catalogue = imagegen.push(ep.host, ep.scheme, ep.ca_file, ep.username, ep.password,
                                       large=large, cache_dir=self.cache_dir)
        self.catalogue_path.write_text(json.dumps(self.catalogue, indent=2) + "\n")
        return self.catalogue

    def state(self) -> dict[str, Any]:
        """What ``regfix.py down`` and other tools need to find and stop this set."""
        return {
            "workdir": str(self.workdir),
            "processes": {name: {"pid": p.popen.pid, "argv": p.argv, "log": str(p.log)}
                          for name, p in self._procs.items() if p.popen is not None},
            "endpoints": {mode: asdict(ep) for mode, ep in self.endpoints.items()},
            "ca_file": next((ep.ca_file for ep in self.endpoints.values() if ep.ca_file), None),
            "username": USERNAME,
            "password": self.password,
            "catalogue": str(self.catalogue_path) if self.catalogue is not None else None,
        }

    # -- internals -----------------------------------------------------------------

    def _spawn(self, proc: _Process) -> None:
        self._procs[proc.name] = proc
        with proc.log.open("ab") as log:
            proc.popen = subprocess.Popen(proc.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=self.workdir)
        self._wait_ready(proc)

    def _wait_ready(self, proc: _Process) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last_error = "no answer"
        assert proc.popen is not None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; log {proc.log}:\n{_log_tail(proc.log)}")
            try:
                resp = requests.get(proc.ready_url, verify=proc.verify, timeout=1.0)
                if resp.status_code in (200, 401):
                    return
                last_error = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last_error = str(exc)
            time.sleep(0.05)  # poll interval, not synchronisation
        raise RuntimeError(f"{proc.name} not ready at {proc.ready_url} after {READY_TIMEOUT}s ({last_error}); "
                           f"log {proc.log}:\n{_log_tail(proc.log)}")

    def _make_tls(self) -> Path:
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
        cert.private_key_pem.write_to_path(str(tls_dir / "server-key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(tls_dir / "server.pem"), append=True)
        return tls_dir / "ca.pem"

    def _make_htpasswd(self) -> Path:
        auth_dir = self.workdir / "auth"
        auth_dir.mkdir(exist_ok=True)
        # Low cost on purpose: registry:2 runs bcrypt on every request, uncached.
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=5)).decode()
        path = auth_dir / "htpasswd"
        path.write_text(f"{USERNAME}:{hashed}\n")
        return path

    def _start_token_issuer(self, htpasswd: Path | None) -> str:
        assert htpasswd is not None
        token_dir = self.workdir / "token"
        token_dir.mkdir(exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        key_path, cert_path = token_dir / "key.pem", token_dir / "cert.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(HERE / "token_issuer.py"), "--listen", f"127.0.0.1:{port}",
                "--key", str(key_path), "--cert", str(cert_path), "--users", str(htpasswd),
                "--issuer", ISSUER_NAME, "--service", SERVICE_NAME, "--expires-in", str(self.token_expires_in)]
        self._spawn(_Process(TOKEN_ISSUER, argv, token_dir / "issuer.log", url + "/stats", True))
        return url

    def _registry_config(self, mode: str, port: int, htpasswd: Path | None, token_url: str | None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": "imc-fixture-http-secret"},
            "health": {"storagedriver": {"enabled": False}},
        }
        if mode == "tls":
            tls_dir = self.workdir / "tls"
            config["http"]["tls"] = {"certificate": str(tls_dir / "server.pem"), "key": str(tls_dir / "server-key.pem")}
        elif mode == "basic":
            config["auth"] = {"htpasswd": {"realm": "imc-basic-realm", "path": str(htpasswd)}}
        elif mode == "token":
            config["auth"] = {"token": {"realm": f"{token_url}/token", "service": SERVICE_NAME, "issuer": ISSUER_NAME,
                                        "rootcertbundle": str(self.workdir / "token" / "cert.pem")}}
        return config


# --------------------------------------------------------------------------- CLI


def _cmdline(pid: int) -> list[str] | None:
    """argv of a live, non-zombie process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def stop_recorded(state: dict[str, Any]) -> list[str]:
    """Stop the processes recorded in a state file, only if still the ones we started."""
    messages: list[str] = []
    pending: list[int] = []
    for name, info in state["processes"].items():
        pid, argv = info["pid"], info["argv"]
        current = _cmdline(pid)
        if current is None:
            messages.append(f"{name} (pid {pid}) already gone")
        elif current != argv:
            messages.append(f"{name}: pid {pid} now runs {' '.join(current)!r}, not ours; left alone")
        else:
            os.kill(pid, signal.SIGTERM)
            pending.append(pid)
            messages.append(f"{name} (pid {pid}) stopped")
    deadline = time.monotonic() + STOP_TIMEOUT
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if _cmdline(pid) is not None]
        time.sleep(0.05)  # poll interval while the processes exit
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        messages.append(f"pid {pid} did not stop in {STOP_TIMEOUT}s; killed")
    return messages


def _cmd_up(args: argparse.Namespace) -> int:
    state_path: Path = args.state
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if any(_cmdline(p["pid"]) == p["argv"] for p in old["processes"].values()):
            print(f"registries from {state_path} are still running; run 'down' first", file=sys.stderr)
            return 1
    rs = RegistrySet(args.workdir, token_expires_in=args.token_expires_in)
    endpoints = rs.start()
    try:
        rs.push_fixtures(large=args.large)
    except BaseException:
        rs.stop()
        raise
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(rs.state(), indent=2) + "\n")
    for mode, ep in endpoints.items():
        print(f"{mode} {ep.url()}")
    print(f"state {state_path}; catalogue {rs.catalogue_path}; user {USERNAME}", file=sys.stderr)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if not args.state.exists():
        print(f"no state at {args.state}; nothing to stop")
        return 0
    for line in stop_recorded(json.loads(args.state.read_text())):
        print(line)
    args.state.unlink()
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    images, store = imagegen.generate(large=args.large)
    catalogue = imagegen.build_catalogue(images, store)
    (store.root / "catalogue.json").write_text(json.dumps(catalogue, indent=2) + "\n")
    for line in imagegen.summary(catalogue):
        print(line)
    print(f"blobs in {store.blob_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``up``, ``down``, ``fixtures``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start all modes detached, push fixtures, write the state file")
    up.add_argument("--state", type=Path, default=DEFAULT_RUN_DIR / "registries.json")
    up.add_argument("--workdir", type=Path, default=DEFAULT_RUN_DIR / "registries")
    up.add_argument("--large", action="store_true")
    up.add_argument("--token-expires-in", type=int, default=300)
    down = sub.add_parser("down", help="stop the processes recorded in the state file")
    down.add_argument("--state", type=Path, default=DEFAULT_RUN_DIR / "registries.json")
    fixtures = sub.add_parser("fixtures", help="generate the images into .fixtures-cache, print a summary")
    fixtures.add_argument("--large", action="store_true")
    args = parser.parse_args(argv)
    handler = {"up": _cmd_up, "down": _cmd_down, "fixtures": _cmd_fixtures}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
