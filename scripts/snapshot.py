#!/usr/bin/env python3
"""Build a snapshot from images in a registry, verify it and optionally publish it: the
CI recipe behind ``make snapshot``.

    scripts/snapshot.py --name web --images "localhost:5000/app:1.0 localhost:5000/db:2" \\
        [--plain-http localhost:5000] [--insecure LIST] [--size GIB] [--push REGISTRY/REPO:TAG] [--home DIR]

Steps, each an ordinary imc command so a CI log shows what a person would type:
``imc cache create NAME --image … --wait``, ``imc volume verify NAME`` and, with
``--push``, ``imc volume push NAME REF``. Prints one summary line on stdout; when
``$GITHUB_STEP_SUMMARY`` names a file (GitHub Actions), appends a Markdown job summary
to it. Exits with the code of the imc command that failed (README, "Exit codes"), 2 for
bad arguments. Only the standard library: it runs before or without imc's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HOME = REPO / ".run" / "imc-home"
EXIT_USAGE = 2
STEP_SUMMARY = "GITHUB_STEP_SUMMARY"
_HEX = re.compile(r"^sha256:([0-9a-f]{64})$")


class StepFailed(Exception):
    """An imc command exited non-zero; its code becomes the script's."""

    def __init__(self, step: str, code: int) -> None:
        super().__init__(f"{step} failed (exit {code})")
        self.step = step
        self.code = code


def usage_error(message: str) -> NoReturn:
    print(f"snapshot: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def split_list(values: list[str]) -> list[str]:
    """Items of flags that may each hold a space- or comma-separated list."""
    return [item for value in values for item in re.split(r"[\s,]+", value) if item]


def human(n: float) -> str:
    """Bytes in decimal units, as imc prints them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def find_imc(explicit: str | None) -> str:
    """``--imc``, else ``$IMC``, else the checkout's venv, else ``imc`` on PATH."""
    candidate = explicit or os.environ.get("IMC")
    if candidate:
        return candidate
    venv = REPO / ".venv" / "bin" / "imc"
    if venv.exists():
        return str(venv)
    found = shutil.which("imc")
    if found is None:
        usage_error("imc is not installed: run 'make install' or pass --imc PATH")
    return found


class Snapshot:
    """One run of the recipe against one imc home."""

    def __init__(self, imc: str, home: Path, name: str) -> None:
        self.imc = imc
        self.home = home
        self.name = name

    def run(self, step: str, *args: str, capture: bool = False) -> str:
        """Run ``imc --home HOME ARGS``; stderr (progress, errors) passes through to ours.
        Without ``capture`` its stdout goes to our stderr, keeping stdout for the summary."""
        argv = [self.imc, "--home", str(self.home), *args]
        print(f"+ imc {' '.join(args)}", file=sys.stderr, flush=True)
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, text=True,
                              stdout=subprocess.PIPE if capture else sys.stderr)
        if done.returncode != 0:
            raise StepFailed(step, done.returncode)
        return done.stdout if capture else ""

    def cache(self) -> dict[str, Any] | None:
        """The ImageCache object, or None when there is none to show (e.g. create refused)."""
        done = subprocess.run([self.imc, "--home", str(self.home), "cache", "get", self.name, "-o", "json"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def image_bytes(self, digest: str) -> int | None:
        """Config plus layers of one image manifest, read from the store (an OCI layout);
        None when the manifest is not there as a single image manifest."""
        m = _HEX.match(digest)
        if m is None:
            return None
        try:
            manifest = json.loads((self.home / "store" / "blobs" / "sha256" / m.group(1)).read_bytes())
            return int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def one_line(name: str, cache: dict[str, Any], pushed: dict[str, Any] | None) -> str:
    status = cache["status"]
    volume = status.get("volume", {})
    count = len(status["images"])
    line = (f"snapshot {name}: {status['phase']}, {count} image{'' if count == 1 else 's'}, "
            f"cache {status['imageCacheId']}, "
            f"volume {human(volume.get('contentBytes', 0))} ({human(status.get('unpackedBytes', 0))} unpacked)")
    if pushed:
        line += f", pushed {pushed['reference']}@{pushed['digest']}"
    return line


def markdown(snap: Snapshot, cache: dict[str, Any] | None, pushed: dict[str, Any] | None,
             failure: StepFailed | None) -> str:
    """The job summary: what was built from what, how big, and where it went."""
    title = f"### imc snapshot `{snap.name}`"
    if failure is not None:
        title += f": {failure.step} failed (exit {failure.code})"
    lines = [title, ""]
    if cache is None:
        return "\n".join(lines) + "\n\n"
    status = cache["status"]
    if status.get("message"):
        lines += [f"> {status['message']}", ""]
    lines += ["| image | digest | size |", "| --- | --- | --- |"]
    for image in status["images"]:
        size = snap.image_bytes(image["digest"])
        platform = f" ({image['platform']})" if image.get("platform") else ""
        lines.append(f"| `{image['name']}`{platform} | `{image['digest']}` | {'' if size is None else human(size)} |")
    volume = status.get("volume", {})
    lines += ["", f"- cache: `{status['imageCacheId']}`, phase {status['phase']}, "
                  f"size {cache['spec']['imageCacheSize']} GiB"]
    if volume.get("state") == "ready":
        lines.append(f"- volume: {human(volume['contentBytes'])} on disk for {human(volume['blobBytes'])} of blobs, "
                     f"{human(status.get('unpackedBytes', 0))} unpacked")
    if pushed:
        lines.append(f"- pushed: `{pushed['reference']}@{pushed['digest']}` "
                     f"({pushed['parts']} {'part' if pushed['parts'] == 1 else 'parts'}, {human(pushed['bytesSent'])} sent)")
        lines.append(f"- on each node: `imc volume pull {pushed['reference']}`")
    return "\n".join(lines) + "\n\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="", help="The cache's name.")
    parser.add_argument("--images", action="append", default=[], metavar="LIST",
                        help="Images to cache, separated by spaces or commas (repeatable).")
    parser.add_argument("--plain-http", default="", metavar="LIST", help="Registries reached over plain HTTP.")
    parser.add_argument("--insecure", default="", metavar="LIST", help="Registries reached over HTTPS unverified.")
    parser.add_argument("--size", default="", metavar="GIB", help="Cache size in GiB (imc's default: 20).")
    parser.add_argument("--push", default="", metavar="REGISTRY/REPO:TAG", help="Publish the snapshot here.")
    parser.add_argument("--home", default="", help=f"imc's home (default: $IMC_HOME, else {DEFAULT_HOME}).")
    parser.add_argument("--imc", help="The imc command (default: $IMC, the checkout's .venv, then PATH).")
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        sys.exit(EXIT_USAGE if e.code else 0)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    name = args.name.strip()
    images = split_list(args.images)
    if not name:
        usage_error("NAME is empty: name the cache (make snapshot NAME=web IMAGES=…)")
    if not images:
        usage_error("IMAGES is empty: list at least one image (IMAGES=\"host:5000/app:1.0 …\")")
    if args.size and not args.size.strip().isdigit():
        usage_error(f"SIZE={args.size!r}: want a whole number of GiB")
    home = Path(args.home or os.environ.get("IMC_HOME") or DEFAULT_HOME)
    snap = Snapshot(find_imc(args.imc), home, name)
    registry_flags = [*(["--plain-http", args.plain_http] if args.plain_http.strip() else []),
                      *(["--insecure", args.insecure] if args.insecure.strip() else [])]
    create = ["cache", "create", name, *(a for ref in images for a in ("--image", ref)), *registry_flags, "--wait"]
    if args.size.strip():
        create += ["--size", args.size.strip()]

    if snap.cache() is not None:
        usage_error(f"an image cache named {name} already exists in {home}: delete it "
                    f"(imc --home {home} cache delete {name}) or use another home")
    pushed: dict[str, Any] | None = None
    failure: StepFailed | None = None
    try:
        snap.run("imc cache create", *create)
        snap.run("imc volume verify", "volume", "verify", name)
        if args.push.strip():
            pushed = json.loads(snap.run("imc volume push", "volume", "push", name, args.push.strip(),
                                         *registry_flags, "-o", "json", capture=True))
    except StepFailed as e:
        failure = e
    cache = snap.cache()
    summary_path = os.environ.get(STEP_SUMMARY)
    if summary_path:
        with open(summary_path, "a", encoding="utf-8") as f:
            f.write(markdown(snap, cache, pushed, failure))
    if failure is not None:
        print(f"snapshot {name}: {failure}", file=sys.stderr)
        return failure.code
    assert cache is not None
    print(one_line(name, cache, pushed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
