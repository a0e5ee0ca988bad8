"""``imc volume push`` and ``imc volume pull``: caches shared between nodes through a registry."""

from __future__ import annotations

import re
from typing import Any

import click

from builder.artifact import PART_SIZE, pull_cache, push_cache
from builder.cli.common import (
    Context,
    emit_json,
    emit_yaml,
    make_keychain,
    output_option,
    pass_ctx,
    registry_options,
    retry_policy,
    show,
    timeout_option,
)
from builder.cli.progress import transfer_progress
from builder.reference import parse as parse_reference
from builder.registry.hosts import HostPolicy, parse_endpoint_list
from builder.registry.uploads import UPLOAD_CHUNK
from builder.units import human

_SIZE_RE = re.compile(r"^(\d+)\s*([kmg]?)i?b?$", re.IGNORECASE)


class ByteSize(click.ParamType):
    """A size such as ``64M``, ``512k`` or ``1048576`` (binary units)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _SIZE_RE.match(str(value).strip())
        if not m or int(m.group(1)) <= 0:
            self.fail(f"{value!r}: want a positive size such as 64M, 512k or 1048576", param, ctx)
        return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


@click.command("push")
@click.argument("name", metavar="NAME|ID")
@click.argument("target", metavar="REGISTRY/REPO:TAG")
@registry_options
@click.option("--part-size", type=ByteSize(), default=PART_SIZE, show_default=f"{PART_SIZE >> 20}M",
              help="Volume bytes per artifact layer: at most this much goes again after a lost connection.")
@click.option("--chunk-size", type=ByteSize(), default=UPLOAD_CHUNK, show_default=f"{UPLOAD_CHUNK >> 20}M",
              help="Bytes per PATCH of a chunked upload.")
@timeout_option
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@output_option("json", "yaml")
@pass_ctx
def volume_push(ctx: Context, name: str, target: str, plain_http: tuple[str, ...], insecure: tuple[str, ...],
                ca_file: str | None, pull_secrets: tuple[str, ...], part_size: int, chunk_size: int,
                timeout: float | None, quiet: bool, output: str) -> None:
    """Publish a Ready cache (its volume and ImageCache record) as an OCI artifact.

    Parts the registry already holds are skipped, so pushing again after a failure
    sends only what is missing. Other nodes import it with 'imc volume pull'.
    """
    ref = parse_reference(target)
    policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
    with transfer_progress("uploaded", quiet or output != "table") as progress:
        result = push_cache(ctx.caches, name, ref, policy, make_keychain(ctx, pull_secrets), part_size=part_size,
                            chunk_size=chunk_size, retry=retry_policy(ctx, timeout), on_progress=progress)
    if output == "json":
        emit_json(result.to_json())
    elif output == "yaml":
        emit_yaml(result.to_json())
    else:
        click.echo(f"pushed {name} to {result.reference}@{result.digest}")
        click.echo(f"volume {human(result.volume_bytes)} in {result.parts} parts: {result.parts_uploaded} uploaded, "
                   f"{result.parts_skipped} already there; {human(result.bytes_sent)} sent")


@click.command("pull")
@click.argument("ref", metavar="REGISTRY/REPO:TAG")
@click.option("--name", help="Name of the new cache (default: the pushed cache's name).")
@registry_options
@click.option("-j", "--concurrency", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Parts downloaded in parallel.")
@timeout_option
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@output_option("json", "yaml")
@pass_ctx
def volume_pull(ctx: Context, ref: str, name: str | None, plain_http: tuple[str, ...], insecure: tuple[str, ...],
                ca_file: str | None, pull_secrets: tuple[str, ...], concurrency: int, timeout: float | None,
                quiet: bool, output: str) -> None:
    """Import a cache pushed with 'imc volume push' as a Ready cache that 'imc serve'
    serves at once. Every part and the whole volume are verified first."""
    source = parse_reference(ref)
    policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
    with transfer_progress("downloaded", quiet or output != "table") as progress:
        cache = pull_cache(ctx.caches, source, policy, make_keychain(ctx, pull_secrets), name=name,
                           concurrency=concurrency, retry=retry_policy(ctx, timeout), on_progress=progress)
    show(cache, output)
    if output == "table":
        click.echo(f"imported from {source}: {', '.join(i.name for i in cache.images)}")
