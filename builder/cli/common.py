"""What the imc commands share: the context and output helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.home import Home
from builder.registry.auth import Keychain, SecretStore
from builder.registry.retry import RetryPolicy
from builder.store import Store

if TYPE_CHECKING:
    from builder.caches import Caches
    from builder.imagecache import ImageCache
    from builder.pull import PullResult


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def emit_yaml(data: Any) -> None:
    """YAML as kubectl prints it: keys in their own order, block style."""
    import yaml  # loaded only by the commands that print YAML

    click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), nl=False)


def emit(data: Any, output: str) -> bool:
    """Print ``data`` as JSON or YAML when ``-o`` asks for it; False means "render a table"."""
    if output == "json":
        emit_json(data)
    elif output == "yaml":
        emit_yaml(data)
    else:
        return False
    return True


def output_option(*choices: str) -> Callable:
    return click.option("-o", "--output", type=click.Choice(["table", *choices]), default="table",
                        show_default=True, help="Output format.")


class Context:
    """What every command needs: imc's home and the store in it."""

    def __init__(self, home: Path) -> None:
        self.home = Home(home)
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.home)
        return self._store

    @property
    def secrets(self) -> SecretStore:
        return SecretStore(self.home.secrets)

    @property
    def caches(self) -> Caches:
        from builder.caches import Caches  # loaded only by the commands that use caches

        return Caches(self.home, self.store)


pass_ctx = click.make_pass_decorator(Context)


def age(created: str | None) -> str:
    """Kubernetes-style age: 42s, 5m, 3h, 12d."""
    from builder.imagecache import now_utc, parse_time

    start = parse_time(created)
    if start is None:
        return "-"
    seconds = int((now_utc() - start).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def print_table(caches: list[ImageCache], wide: bool = False) -> None:
    """The cache listing: NAME AGE CACHEID PHASE PROGRESS, as kubectl shows it, and
    STALE: yes when a tag moved since the build, no when the last check found none,
    - before any check (or with every image pinned by digest). ``wide`` adds how long
    ago each was last used and how many hits ``imc serve`` recorded."""
    header: tuple[str, ...] = ("NAME", "AGE", "CACHEID", "PHASE", "PROGRESS", "STALE")
    rows: list[tuple[str, ...]] = [(c.name, age(c.created), c.id, c.phase, f"{c.progress}%", stale_cell(c))
                                   for c in caches]
    if wide:
        header += ("LAST-USED", "HITS")
        rows = [(*row, age(c.last_used), str(c.hit_count)) for row, c in zip(rows, caches, strict=True)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [header, *rows]:
        click.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def stale_cell(cache: ImageCache) -> str:
    from builder.imagecache import STALE_CONDITION

    return "yes" if cache.stale else "no" if cache.condition(STALE_CONDITION) is not None else "-"


def show(cache: ImageCache, output: str, wide: bool = False) -> None:
    """One cache as the ImageCache object (json, yaml) or a table row (``wide``: with
    its last use and hits)."""
    if output == "json":
        emit_json(cache.to_object())
    elif output == "yaml":
        emit_yaml(cache.to_object())
    else:
        print_table([cache], wide=wide or output == "wide")


def _use_authfile(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Set in the environment, where containers-auth.json(5) says an override lives: the
    # keychains of this process and of a build it starts in the background both read it.
    if value is not None:
        os.environ["REGISTRY_AUTH_FILE"] = os.path.abspath(value)


def authfile_option(f: Callable) -> Callable:
    """``--authfile FILE``, as podman, skopeo and buildah take it."""
    return click.option("--authfile", type=click.Path(exists=True, dir_okay=False), expose_value=False,
                        callback=_use_authfile, is_eager=True,
                        help="Credentials file (containers-auth.json) read before the others; "
                             "default $REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR/containers/auth.json.")(f)


def registry_options(f: Callable) -> Callable:
    """The flags every command that talks to registries shares."""
    f = authfile_option(f)
    f = click.option("--pull-secret", "pull_secrets", multiple=True, metavar="NS:NAME",
                     help="Use a stored pull secret (repeatable).")(f)
    f = click.option("--ca-file", type=click.Path(dir_okay=False), help="Extra CA bundle to trust.")(f)
    f = click.option("--insecure", "insecure", multiple=True, metavar="LIST",
                     help="Endpoints (host or host:port, comma-separated) to reach over HTTPS without "
                          "certificate verification.")(f)
    f = click.option("--plain-http", "plain_http", multiple=True, metavar="LIST",
                     help="Endpoints (host or host:port, comma-separated) to reach over plain HTTP.")(f)
    return f


def timeout_option(f: Callable) -> Callable:
    """``--timeout SECONDS``: the deadline of a command that talks to registries."""
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                        help="Give up after this many seconds (exit 3). Default: the pull_timeout_seconds "
                             "setting (0, none). A download that receives nothing for pull_stall_seconds "
                             "(120) fails sooner.")(f)


def retry_policy(ctx: Context, timeout: float | None) -> RetryPolicy:
    """The retry policy of this command: the home's settings, the deadline from now."""
    from builder.imagecache import Settings

    return Settings.load(ctx.home.settings).retry_policy(timeout)


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

