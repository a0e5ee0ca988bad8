"""The CLI's surface: mirror-config snippets that parse, -o json|yaml on every
listing, --version, shell completion, progress lines."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from builder import __version__
from builder.artifact import BytesMoved, PartDone, PartSkipped, TransferPlanned, Verifying
from builder.caches import Caches
from builder.cli import cli
from builder.cli.progress import PullLines, TransferLines, pull_progress, transfer_progress
from builder.digest import Digest
from builder.imagecache import CacheSpec
from builder.pull import BlobDone, BlobProgress, BlobStarted, ImageDone, ImageResolved, PullPlanned


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    return result.exit_code, result.output


# -- mirror-config -----------------------------------------------------------------------


def test_containerd_hosts_toml_points_the_registry_at_imc_serve(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--containerd", "--registry", "quay.io", "--server", "127.0.0.1:5050")
    assert code == 0
    doc = tomllib.loads(out)
    assert doc["server"] == "https://quay.io"
    assert doc["host"] == {"http://127.0.0.1:5050": {"capabilities": ["pull", "resolve"], "dial_timeout": "1s"}}
    assert out.startswith("# /etc/containerd/certs.d/quay.io/hosts.toml")


def test_containerd_for_docker_hub_and_an_https_mirror(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--containerd")
    assert code == 0
    doc = tomllib.loads(out)
    assert doc["server"] == "https://registry-1.docker.io"
    assert list(doc["host"]) == ["http://127.0.0.1:5050"]
    _, out = run(tmp_path, "mirror-config", "--containerd", "--server", "https://10.0.0.5:443", "--insecure")
    assert tomllib.loads(out)["host"]["https://10.0.0.5:443"]["skip_verify"] is True
    _, out = run(tmp_path, "mirror-config", "--containerd", "--server", "https://10.0.0.5:443")
    assert "skip_verify" not in tomllib.loads(out)["host"]["https://10.0.0.5:443"]


def test_containerd_private_ca_pull_only_dial_timeout_and_every_registry(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--containerd", "--registry", "quay.io", "--server",
                    "https://imc.local:5443", "--ca-file", "/etc/imc/ca.pem", "--pull-only", "--dial-timeout", "300ms",
                    "--every-registry")
    assert code == 0
    quay, default = re.split(r"\n(?=# /etc/containerd/certs.d/)", out)
    assert tomllib.loads(quay) == {"server": "https://quay.io", "host": {"https://imc.local:5443": {
        "capabilities": ["pull"], "ca": "/etc/imc/ca.pem", "dial_timeout": "300ms"}}}
    assert default.startswith("# /etc/containerd/certs.d/_default/hosts.toml\n")
    assert "server" not in tomllib.loads(default)  # the image's own registry is the fallback
    assert '[plugins."io.containerd.grpc.v1.cri".registry] config_path = "/etc/containerd/certs.d"' in out
    assert '[plugins."io.containerd.cri.v1.images".registry] config_path = "/etc/containerd/certs.d"' in out
    assert out.endswith("imc serve --pull-through --upstream quay.io\n")
    _, out = run(tmp_path, "mirror-config", "--containerd", "--every-registry", "--dial-timeout", "0")
    assert out.startswith("# /etc/containerd/certs.d/_default/hosts.toml\n") and "dial_timeout" not in out
    assert "--upstream REGISTRY for each registry" in out


@pytest.mark.parametrize("args,message", [
    (["--containerd", "--ca-file", "/etc/ca.pem"], "--ca-file needs an https:// --server"),
    (["--containerd", "--server", "https://imc:443", "--insecure", "--ca-file", "/ca.pem"], "--ca-file needs"),
    (["--containerd", "--server", "https://imc:443", "--ca-file", "ca.pem"], "absolute path"),
    (["--containerd", "--dial-timeout", "soon"], "--dial-timeout 'soon'"),
    (["--podman", "--pull-only"], "use them with --containerd"),
])
def test_containerd_options_refuse_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "mirror-config", *args])
    assert result.exit_code != 0 and message in str(result.exception or result.output)
    assert result.output == ""


def test_docker_daemon_json(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--docker", "--server", "127.0.0.1:5050")
    assert code == 0
    assert json.loads(out) == {"registry-mirrors": ["http://127.0.0.1:5050"],
                               "insecure-registries": ["127.0.0.1:5050"]}
    _, out = run(tmp_path, "mirror-config", "--docker", "--server", "https://mirror.local:443")
    assert json.loads(out) == {"registry-mirrors": ["https://mirror.local:443"]}


def test_docker_mirrors_only_docker_hub(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "mirror-config", "--docker", "--registry", "quay.io"])
    assert result.exception is not None and "only to Docker Hub" in str(result.exception)


def test_podman_registries_conf(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--podman", "--registry", "ghcr.io", "--server", "127.0.0.1:5050")
    assert code == 0
    doc = tomllib.loads(out)
    assert doc["registry"] == [{"location": "ghcr.io", "mirror": [{"location": "127.0.0.1:5050", "insecure": True}]}]


def test_plain_http_registries(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--containerd", "--registry", "10.1.2.3:5000", "--registry", "quay.io",
                    "--plain-http", "10.1.2.3:5000")
    assert code == 0
    local, quay = re.split(r"\n(?=# /etc/containerd/certs.d/)", out)
    assert tomllib.loads(local)["server"] == "http://10.1.2.3:5000"
    assert tomllib.loads(quay)["server"] == "https://quay.io"
    assert out.endswith("imc serve --pull-through --upstream 10.1.2.3:5000 --upstream quay.io "
                        "--plain-http 10.1.2.3:5000\n")
    code, out = run(tmp_path, "mirror-config", "--podman", "--registry", "10.1.2.3:5000", "--plain-http",
                    "10.1.2.3:5000", "--server", "https://imc.local:5443")
    assert code == 0
    assert tomllib.loads(out)["registry"] == [{"location": "10.1.2.3:5000", "insecure": True,
                                               "mirror": [{"location": "imc.local:5443"}]}]


@pytest.mark.parametrize("args,message", [
    (["--containerd", "--registry", "quay.io", "--plain-http", "ghcr.io"],
     "--plain-http ghcr.io: not a --registry of this configuration"),
    (["--docker", "--plain-http", "docker.io"], "--plain-http docker.io: Docker Hub is reached over HTTPS only"),
])
def test_plain_http_refuses_what_it_cannot_mean(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "mirror-config", *args])
    assert result.exit_code != 0 and str(result.exception) == message
    assert result.output == ""


def test_mirror_config_needs_a_runtime(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config")
    assert code == 2 and "--containerd" in out


# -- -o json and -o yaml on listings -------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with one (failed) cache, so listings have something to show."""
    caches = Caches(tmp_path)
    _, lease = caches.create("demo", CacheSpec(images=["127.0.0.1:1/none/app:1.0"]))
    lease.release()  # the "builder" is gone: the next read marks the cache Failed
    return tmp_path


@pytest.mark.parametrize("args", [
    ("layers", "list"), ("cache", "list"), ("cache", "events", "demo"), ("secret", "list"), ("config", "get"),
    ("gc",), ("cache", "get", "demo"), ("cache", "check"),
])
def test_listings_print_the_same_data_as_json_and_yaml(home: Path, args: tuple[str, ...]) -> None:
    code_j, as_json = run(home, *args, "-o", "json")
    code_y, as_yaml = run(home, *args, "-o", "yaml")
    assert code_j == code_y == 0
    assert yaml.safe_load(as_yaml) == json.loads(as_json)


def test_cache_events_in_yaml(home: Path) -> None:
    _, out = run(home, "cache", "events", "demo", "-o", "yaml")
    reasons = [e["reason"] for e in yaml.safe_load(out)]
    assert reasons[0] == "Creating" and reasons[-1] == "Failed"


def test_match_in_yaml_still_exits_13_without_a_match(home: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(home), "match", "--image", "nginx:1.7.9", "-o", "yaml"])
    doc = yaml.safe_load(result.output)
    assert doc["cache"] is None and doc["reason"]
    assert getattr(result.exception, "exit_code", None) == 13


# -- version and completion ----------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    code, out = run(tmp_path, "--version")
    assert code == 0 and out.strip() == f"imc, version {__version__}"


def test_bash_completion_through_click(tmp_path: Path) -> None:
    imc = Path(sys.executable).with_name("imc")
    if not imc.exists():
        pytest.skip("the imc console script is not installed in this environment")
    env = {**os.environ, "IMC_HOME": str(tmp_path)}
    source = subprocess.run([str(imc)], env={**env, "_IMC_COMPLETE": "bash_source"}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert source.returncode == 0 and "complete " in source.stdout and "_imc_completion" in source.stdout
    words = subprocess.run([str(imc)], env={**env, "_IMC_COMPLETE": "bash_complete", "COMP_WORDS": "imc volume p",
                                            "COMP_CWORD": "2"}, capture_output=True, text=True, timeout=30,
                           check=False)
    assert words.stdout.split() == ["plain,pull", "plain,push"]


# -- progress --------------------------------------------------------------------------


def test_pull_progress_in_a_log_renders_each_kind_of_event() -> None:
    layer, config, manifest = Digest.of(b"layer"), Digest.of(b"config"), Digest.of(b"manifest")
    out = io.StringIO()
    progress = PullLines(out)
    for event in (ImageResolved("r/app:v1", manifest, 500), PullPlanned(blobs=2, size=3000),
                  BlobStarted("r/app:v1", layer, 2000, "layer", offset=700),
                  BlobProgress("r/app:v1", layer, 2000, "layer", delta=1300),
                  BlobDone("r/app:v1", layer, 2000, "layer", origin="registry"),
                  BlobDone("r/app:v1", config, 1000, "config", origin="store"),
                  BlobDone("r/app:v1", config, 1000, "config", origin="store"),
                  ImageDone("r/app:v1", manifest, bytes_fetched=2000, bytes_reused=1000)):
        progress(event)
    lines = out.getvalue().splitlines()
    assert lines[:5] == [
        f"r/app:v1: resolved {manifest}",
        "2 blobs, 3.0 kB in total",
        f"  resume {layer.short} at 700 B",
        f"  fetched {layer.short}      2.0 kB  layer",
        f"  reused  {config.short}      1.0 kB  config",
    ]
    assert lines[5].startswith("  3.0 kB of 3.0 kB (100%) fetched, ")  # the summary once all is there
    assert lines[6:] == ["r/app:v1: complete"]
    assert progress.tally.moved == 1300  # the rate counts only bytes that arrived now


def test_pull_progress_in_a_log_summarises_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Digest.of(b"layer")
    out = io.StringIO()
    progress = PullLines(out)
    progress(PullPlanned(blobs=1, size=4000))
    progress(BlobProgress("r/app:v1", layer, 4000, "layer", delta=1000))
    assert "of" not in out.getvalue().splitlines()[-1]  # not yet due
    progress.last_summary -= 11
    progress(BlobProgress("r/app:v1", layer, 4000, "layer", delta=1000))
    assert out.getvalue().splitlines()[-1].startswith("  2.0 kB of 4.0 kB (50%) fetched, ")


def test_transfer_progress_in_a_log_renders_each_kind_of_event() -> None:
    out = io.StringIO()
    progress = TransferLines("uploaded", out)
    for event in (TransferPlanned((4000, 5000)), PartSkipped(0, 2, 4000), BytesMoved(3000, 1), BytesMoved(-1000, 1),
                  BytesMoved(3000, 1), PartDone(1, 2, 5000), Verifying(9000)):
        progress(event)
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "2 parts, 9.0 kB in total",
        "  skipped  part 1/2      4.0 kB  (already in the registry)",
        "  a session was lost: 1.0 kB go again",
        "  uploaded part 2/2      5.0 kB",
    ]
    assert lines[4].startswith("  9.0 kB of 9.0 kB (100%) uploaded, ")
    assert lines[5:] == ["verifying the volume (9.0 kB)"]
    assert progress.tally.moved == 5000


def test_quiet_progress_is_none_and_a_pipe_gets_lines() -> None:
    with pull_progress(True) as none, transfer_progress("uploaded", True) as nothing:
        assert none is None and nothing is None
    with pull_progress(False, io.StringIO()) as lines, transfer_progress("uploaded", False, io.StringIO()) as parts:
        assert isinstance(lines, PullLines) and isinstance(parts, TransferLines)


def test_mirror_config_for_several_registries_names_the_same_upstreams(tmp_path: Path) -> None:
    code, out = run(tmp_path, "mirror-config", "--containerd", "--registry", "quay.io", "--registry", "docker.io")
    assert code == 0
    files = re.split(r"\n(?=# /etc/containerd/certs.d/)", out)
    assert [tomllib.loads(f)["server"] for f in files] == ["https://quay.io", "https://registry-1.docker.io"]
    assert out.endswith("imc serve --pull-through --upstream quay.io --upstream docker.io\n")
    code, out = run(tmp_path, "mirror-config", "--podman", "--registry", "ghcr.io", "--registry", "quay.io")
    assert code == 0
    assert [r["location"] for r in tomllib.loads(out)["registry"]] == ["ghcr.io", "quay.io"]
    assert out.endswith("imc serve --pull-through --upstream ghcr.io --upstream quay.io\n")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "mirror-config", "--docker", "--registry", "docker.io",
                                      "--registry", "quay.io"])
    assert result.exception is not None and "only to Docker Hub" in str(result.exception)
