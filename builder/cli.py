"""The ``imc`` command: a thin shell over the library.

Each command parses its flags, makes one or two library calls, and renders the
result. Every ``ImcError`` becomes one line on stderr and the error's exit code.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from builder import __version__
from builder.digest import Digest
from builder.errors import ImcError, NotFoundLocalError, ValidationError
from builder.oci import Platform, layer_compression
from builder.pull import DEFAULT_CONCURRENCY, PullEvent, Puller, PullResult
from builder.reference import parse as parse_reference
from builder.registry.auth import Keychain, SecretStore
from builder.registry.hosts import HostPolicy, parse_endpoint_list
from builder.store import Store, default_home, layer_usage

EXIT_USAGE = 2


def human(n: float) -> str:
    """Bytes as people read them (decimal units, like registries and skopeo)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def output_option(*choices: str) -> Callable:
    return click.option("-o", "--output", type=click.Choice(["table", *choices]), default="table",
                        show_default=True, help="Output format.")


class Context:
    """What every command needs: imc's home and the store in it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.home)
        return self._store

    @property
    def secrets(self) -> SecretStore:
        return SecretStore(self.home / "secrets")


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imc")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="IMC_HOME",
              help="imc's data directory (default: $IMC_HOME or ~/.local/share/imc).")
@click.option("-v", "--verbose", is_flag=True, help="Log requests and decisions to stderr.")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, verbose: bool) -> None:
    """imc builds image caches ahead of time so that no layer is pulled twice."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(home or default_home())


# -- pull ------------------------------------------------------------------------------


class PullProgress:
    """Renders pull events on stderr: a line per blob, and a live total on a terminal."""

    def __init__(self, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.bytes = 0
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.seen: set[Digest] = set()

    def __call__(self, event: PullEvent) -> None:
        with self.lock:
            if event.kind == "resolved":
                self._line(f"{event.image}: resolved {event.digest}")
            elif event.kind == "blob-start":
                self.bytes += event.bytes
                if event.bytes:
                    self._line(f"  resume {event.digest.short} at {human(event.bytes)}")  # type: ignore[union-attr]
            elif event.kind == "blob-bytes":
                self.bytes += event.bytes
                self._status()
            elif event.kind == "blob-done" and event.digest not in self.seen:
                self.seen.add(event.digest)  # type: ignore[arg-type]
                verb = "reused " if event.reused else "fetched"
                self._line(f"  {verb} {event.digest.short}  {human(event.size):>10}  {event.media_type}")  # type: ignore[union-attr]
            elif event.kind == "image-done":
                self._line(f"{event.image}: complete")

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def _status(self) -> None:
        now = time.monotonic()
        if not self.tty or now - self.last_draw < 0.1:
            return
        self.last_draw = now
        rate = self.bytes / max(now - self.started, 1e-6)
        self.stream.write(f"\r\x1b[K  {human(self.bytes)} fetched, {human(rate)}/s")
        self.stream.flush()


def registry_options(f: Callable) -> Callable:
    """The flags every command that talks to registries shares."""
    f = click.option("--pull-secret", "pull_secrets", multiple=True, metavar="NS:NAME",
                     help="Use a stored pull secret (repeatable).")(f)
    f = click.option("--ca-file", type=click.Path(dir_okay=False), help="Extra CA bundle to trust.")(f)
    f = click.option("--insecure", "insecure", multiple=True, metavar="LIST",
                     help="Endpoints (host or host:port, comma-separated) to reach over HTTPS without "
                          "certificate verification.")(f)
    f = click.option("--plain-http", "plain_http", multiple=True, metavar="LIST",
                     help="Endpoints (host or host:port, comma-separated) to reach over plain HTTP.")(f)
    return f


def make_keychain(ctx: Context, pull_secrets: tuple[str, ...]) -> Keychain:
    return Keychain([ctx.secrets.load(name) for name in pull_secrets])


def pull_result_json(result: PullResult) -> dict:
    return {
        "images": [
            {"reference": str(img.reference), "name": img.name, "digest": str(img.descriptor.digest),
             "mediaType": img.descriptor.media_type,
             "index": str(img.index_digest) if img.index_digest else None,
             "platform": str(img.platform) if img.platform else None,
             "bytesFetched": img.bytes_fetched, "bytesReused": img.bytes_reused,
             "blobs": [{"digest": str(b.descriptor.digest), "size": b.descriptor.size,
                        "mediaType": b.descriptor.media_type, "fetched": b.fetched} for b in img.blobs]}
            for img in result.images
        ],
        "bytesFetched": result.bytes_fetched,
        "bytesReused": result.bytes_reused,
        "blobsFetched": result.blobs_fetched,
        "blobsReused": result.blobs_reused,
    }


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--platform", help="os/arch[/variant] to choose from multi-arch images (default: this host's).")
@click.option("-j", "--concurrency", type=click.IntRange(1, 64), default=DEFAULT_CONCURRENCY, show_default=True,
              help="Blobs downloaded in parallel.")
@registry_options
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@output_option("json")
@pass_ctx
def pull(ctx: Context, refs: tuple[str, ...], platform: str | None, concurrency: int, plain_http: tuple[str, ...],
         insecure: tuple[str, ...], ca_file: str | None, pull_secrets: tuple[str, ...], quiet: bool,
         output: str) -> None:
    """Pull images into the store, fetching only the blobs it does not hold."""
    references = [parse_reference(r) for r in refs]
    policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
    puller = Puller(ctx.store, policy, make_keychain(ctx, pull_secrets),
                    Platform.parse(platform) if platform else None, concurrency,
                    on_event=None if quiet or output == "json" else PullProgress())
    started = time.monotonic()
    result = puller.pull(references)
    elapsed = time.monotonic() - started
    if output == "json":
        emit_json({**pull_result_json(result), "seconds": round(elapsed, 3)})
        return
    for img in result.images:
        click.echo(f"{img.name}  {img.descriptor.digest}")
    click.echo(f"fetched {human(result.bytes_fetched)} in {result.blobs_fetched} blobs, reused "
               f"{human(result.bytes_reused)} in {result.blobs_reused} blobs, {elapsed:.1f}s")


# -- layers ------------------------------------------------------------------------------


@cli.group()
def layers() -> None:
    """Inspect and verify the layers in the store."""


def resolve_digest(store: Store, text: str) -> Digest:
    """A full digest, or a unique prefix of a stored blob's hex (as listings show)."""
    if ":" in text:
        return Digest.parse(text)
    prefix = text.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise ValidationError(f"invalid digest {text!r}: want sha256:<hex> or a hex prefix")
    matches = [d for d, _ in store.all_blobs() if d.hex.startswith(prefix)]
    if not matches:
        raise NotFoundLocalError(f"no blob in the store starts with {text}")
    if len(matches) > 1:
        raise ValidationError(f"{text} is ambiguous: {len(matches)} blobs start with it")
    return matches[0]


@layers.command("list")
@output_option("json")
@pass_ctx
def layers_list(ctx: Context, output: str) -> None:
    """Every stored layer: digest, size, media type, and the images that use it."""
    usage = layer_usage(ctx.store)
    rows = sorted(usage.values(), key=lambda u: (-u.descriptor.size, str(u.descriptor.digest)))
    if output == "json":
        emit_json([{"digest": str(u.descriptor.digest), "size": u.descriptor.size,
                    "mediaType": u.descriptor.media_type, "present": u.present, "images": u.images}
                   for u in rows])
        return
    click.echo(f"{'DIGEST':<19} {'SIZE':>10}  {'MEDIA TYPE':<48} IMAGES")
    for u in rows:
        click.echo(f"sha256:{u.descriptor.digest.short} {human(u.descriptor.size):>10}  "
                   f"{u.descriptor.media_type:<48} {', '.join(u.images)}")


@layers.command("inspect")
@click.argument("digest")
@output_option("json")
@pass_ctx
def layers_inspect(ctx: Context, digest: str, output: str) -> None:
    """One blob: size, media type, compression, path, and the images that use it."""
    store = ctx.store
    d = resolve_digest(store, digest)
    size = store.size(d)
    use = layer_usage(store).get(d)
    media_type = use.descriptor.media_type if use else ""
    info = {"digest": str(d), "size": size, "mediaType": media_type or None,
            "compression": layer_compression(media_type) if media_type else None,
            "path": str(store.blob_path(d)), "images": use.images if use else []}
    if output == "json":
        emit_json(info)
        return
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else ("-" if value is None else value)
        click.echo(f"{key + ':':<13} {shown}")


@layers.command("verify")
@output_option("json")
@pass_ctx
def layers_verify(ctx: Context, output: str) -> None:
    """Rehash every stored blob; quarantine corrupt ones. Exits 4 if any was bad."""
    report = ctx.store.verify()
    if output == "json":
        emit_json({"checked": report.checked, "bytes": report.bytes, "corrupt": report.corrupt,
                   "missing": report.missing, "ok": report.ok})
    else:
        click.echo(f"checked {report.checked} blobs, {human(report.bytes)}")
        for d in report.corrupt:
            click.echo(f"corrupt {d} (moved to {ctx.store.quarantine})")
        for d in report.missing:
            click.echo(f"missing {d}")
    if not report.ok:
        sys.exit(4)


@cli.command()
@output_option("json")
@pass_ctx
def gc(ctx: Context, output: str) -> None:
    """Remove blobs that no image needs, and abandoned partial downloads."""
    report = ctx.store.gc()
    if output == "json":
        emit_json({"blobsRemoved": report.blobs_removed, "bytesFreed": report.bytes_freed,
                   "partialsRemoved": report.partials_removed})
        return
    click.echo(f"removed {report.blobs_removed} blobs ({human(report.bytes_freed)}) and "
               f"{report.partials_removed} partial downloads")


# -- secrets ---------------------------------------------------------------------------------


@cli.group()
def secret() -> None:
    """Named registry credentials (pull secrets), stored readable by you only."""


@secret.command("create")
@click.argument("name", metavar="NAMESPACE:NAME")
@click.option("--registry", required=True, help="The registry endpoint (host or host:port).")
@click.option("--username", required=True)
@click.option("--password-stdin", is_flag=True, required=True, help="Read the password from standard input.")
@pass_ctx
def secret_create(ctx: Context, name: str, registry: str, username: str, password_stdin: bool) -> None:
    """Store credentials for a registry under NAMESPACE:NAME."""
    (endpoint,) = parse_endpoint_list(registry) or {""}
    if not endpoint:
        raise ValidationError("--registry is empty")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValidationError("no password on standard input")
    ctx.secrets.create(name, endpoint, username, password)
    click.echo(f"secret {name} stored for {endpoint}")


@secret.command("list")
@output_option("json")
@pass_ctx
def secret_list(ctx: Context, output: str) -> None:
    """The names of stored secrets (never their contents)."""
    names = ctx.secrets.list()
    if output == "json":
        emit_json(names)
    else:
        for n in names:
            click.echo(n)


@secret.command("delete")
@click.argument("name", metavar="NAMESPACE:NAME")
@pass_ctx
def secret_delete(ctx: Context, name: str) -> None:
    """Delete a stored secret."""
    if not ctx.secrets.delete(name):
        raise NotFoundLocalError(f"pull secret {name} does not exist")
    click.echo(f"secret {name} deleted")


def main() -> None:
    """Entry point: run the CLI, turning every imc error into one line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except ImcError as e:
        click.echo(f"imc: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("imc: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("imc: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
