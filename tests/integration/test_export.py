"""``imc volume export``: archives the real loaders take, checked with podman load and skopeo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.imccli import IMC, imc_env, kill9, ok, run_imc, start_paused

IMAGES = ("fixtures/app:1.0", "fixtures/app:2.0", "fixtures/oci-app:1.0")


class Podman:
    """podman with a private store (vfs, under the test's directory), so loading
    touches nothing of the machine's own images. podman refuses a run root longer than
    50 characters, so that one lives in a short directory of its own (``run``)."""

    def __init__(self, root: Path, run: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{run}"\ngraphroot = "{root}/root"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "TMPDIR": str(root)}
        self.argv = ["podman", "--root", str(root / "root"), "--runroot", str(run),
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                     "--tmpdir", str(root / "tmp")]

    def run(self, *args: str, stdin: Any = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.argv, *args], capture_output=True, text=True, env=self.env, stdin=stdin,
                             timeout=180)
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stderr}"
        return out

    def image_ids(self, refs: list[str]) -> dict[str, str]:
        """``podman image inspect``: each reference's image ID (its config digest)."""
        inspected = json.loads(self.run("image", "inspect", *refs).stdout)
        return {ref: "sha256:" + image["Id"] for ref, image in zip(refs, inspected, strict=True)}


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    run = Path(tempfile.mkdtemp(prefix="imc-podman-"))
    try:
        yield Podman(tmp_path / "podman", run)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def config_digest(catalogue: dict[str, Any], ref: str) -> str:
    return catalogue["images"][ref]["manifests"][0]["config"]["digest"]


def skopeo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return subprocess.run(["skopeo", "--policy", str(policy), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp)})


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, plain_registry: Any) -> dict[str, Any]:
    """A Ready cache ``web`` of three images (two share their base layers with each other
    and one with the third) and its docker-archive export."""
    root = tmp_path_factory.mktemp("export")
    home = root / "home"
    args = ["cache", "create", "web", "--wait", "-q", "--plain-http", plain_registry.host]
    for ref in IMAGES:
        args += ["--image", f"{plain_registry.host}/{ref}"]
    ok(home, *args)
    archive = root / "web.tar"
    out = ok(home, "volume", "export", "web", "--format", "docker-archive", "-o", str(archive))
    assert out.stdout.startswith(f"wrote {archive} (")
    return {"home": home, "archive": archive, "refs": [f"{plain_registry.host}/{r}" for r in IMAGES]}


def test_podman_loads_every_image_under_its_tag(web: dict[str, Any], catalogue: dict[str, Any],
                                                podman: Podman) -> None:
    loaded = podman.run("load", "-i", str(web["archive"]))
    assert sorted(line for line in loaded.stdout.splitlines() if line.startswith("Loaded image")) == sorted(
        f"Loaded image: {ref}" for ref in web["refs"])
    assert podman.image_ids(web["refs"]) == {
        ref: config_digest(catalogue, short) for ref, short in zip(web["refs"], IMAGES, strict=True)}
    assert len(json.loads(podman.run("images", "--format", "json").stdout)) == len(IMAGES)


def test_docker_archive_writes_each_shared_layer_once(web: dict[str, Any], catalogue: dict[str, Any]) -> None:
    with tarfile.open(web["archive"]) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert len(names) == len(set(names))
    assert [entry["RepoTags"] for entry in manifest] == [[ref] for ref in web["refs"]]
    layers = [path for entry in manifest for path in entry["Layers"]]
    assert len(set(layers)) < len(layers)  # the base layers are listed by several images...
    blobs = {f"blobs/sha256/{b['digest'][7:]}" for ref in IMAGES
             for b in (catalogue["images"][ref]["manifests"][0]["config"],
                       *catalogue["images"][ref]["manifests"][0]["layers"])}
    assert sorted(n for n in names if n.startswith("blobs/sha256/")) == sorted(blobs)  # ...and stored once


def test_podman_loads_from_a_pipe(web: dict[str, Any], catalogue: dict[str, Any], podman: Podman) -> None:
    export = subprocess.Popen([*IMC, "volume", "export", "web", "--format", "docker-archive", "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=imc_env(web["home"]))
    assert export.stdout is not None
    try:
        podman.run("load", stdin=export.stdout)
    finally:
        export.stdout.close()
        _, err = export.communicate(timeout=60)
    assert export.returncode == 0, err
    assert err.decode().startswith("wrote docker-archive to standard output: ")
    assert podman.image_ids(web["refs"]) == {
        ref: config_digest(catalogue, short) for ref, short in zip(web["refs"], IMAGES, strict=True)}
    assert sorted(p.name for p in web["archive"].parent.iterdir()) == ["home", "web.tar"]


@pytest.mark.parametrize("short", IMAGES)
def test_skopeo_copies_each_image_out_of_the_archive(web: dict[str, Any], catalogue: dict[str, Any],
                                                     tmp_path: Path, short: str) -> None:
    ref = next(r for r in web["refs"] if r.endswith(short))
    diff_ids = [layer["diffId"] for layer in catalogue["images"][short]["manifests"][0]["layers"]]
    # dir: keeps the image as the archive gives it: the config byte for byte.
    copied = skopeo(tmp_path, "copy", "-q", f"docker-archive:{web['archive']}:{ref}", f"dir:{tmp_path / 'dir'}")
    assert copied.returncode == 0, copied.stderr
    manifest = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    assert manifest["config"]["digest"] == config_digest(catalogue, short)
    # oci: converts the config to OCI's (a new digest), with the same layers.
    dest = tmp_path / "oci"
    copied = skopeo(tmp_path, "copy", "-q", f"docker-archive:{web['archive']}:{ref}", f"oci:{dest}:x")
    assert copied.returncode == 0, copied.stderr
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads((dest / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((dest / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["rootfs"]["diff_ids"] == diff_ids and len(manifest["layers"]) == len(diff_ids)


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_image_option_exports_only_the_named_images(web: dict[str, Any], catalogue: dict[str, Any],
                                                    tmp_path: Path, podman: Podman, fmt: str) -> None:
    chosen = web["refs"][2]
    archive = tmp_path / "one.tar"
    out = ok(web["home"], "volume", "export", "web", "--format", fmt, "--image", chosen, "-o", str(archive))
    assert out.stdout.rstrip().endswith(f": {chosen}")
    m = catalogue["images"][IMAGES[2]]["manifests"][0]
    wanted = {m["config"]["digest"][7:], *(layer["digest"][7:] for layer in m["layers"])}
    with tarfile.open(archive) as tar:
        blobs = {n.rsplit("/", 1)[1] for n in tar.getnames() if n.startswith("blobs/sha256/") and n[-1] != "/"}
        if fmt == "docker-archive":
            listed = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
            assert [entry["RepoTags"] for entry in listed] == [[chosen]]
            assert blobs == wanted
        else:
            index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
            assert [e["annotations"]["org.opencontainers.image.ref.name"] for e in index["manifests"]] == [chosen]
            assert blobs == wanted | {m["digest"][7:]}
    if fmt == "oci-archive":  # one image: podman load takes an oci-archive too
        podman.run("load", "-i", str(archive))
        assert podman.image_ids([chosen]) == {chosen: m["config"]["digest"]}


def test_export_of_an_image_the_cache_lacks_fails_and_writes_nothing(web: dict[str, Any], tmp_path: Path) -> None:
    archive = tmp_path / "none.tar"
    out = run_imc(web["home"], "volume", "export", "web", "--format", "docker-archive",
                  "--image", f"{web['refs'][0]}-nope", "-o", str(archive))
    assert out.returncode == 6
    assert out.stderr.count("\n") == 1 and "is not in cache web (it holds" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_partial_file_and_the_old_archive_intact(web: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    archive = target / "web.tar"
    archive.write_bytes(b"the previous export")
    proc = start_paused(web["home"], tmp_path, "export-midway", "volume", "export", "web",
                        "--format", "docker-archive", "-o", str(archive))
    kill9(proc)
    assert sorted(p.name for p in target.iterdir()) == ["web.tar"]
    assert archive.read_bytes() == b"the previous export"
    ok(web["home"], "volume", "export", "web", "--format", "docker-archive", "-o", str(archive))
    assert archive.read_bytes() == web["archive"].read_bytes()  # the same bytes every time
