"""Commands over the store: pull, layers, gc, and pull secrets."""

from __future__ import annotations

import sys
import time

import click

from builder.cli.common import (
    Context,
    emit,
    make_keychain,
    output_option,
    pass_ctx,
    pull_result_json,
    registry_options,
    retry_policy,
    timeout_option,
)
from builder.cli.progress import pull_progress
from builder.digest import Digest
from builder.errors import ExitCode, NotFoundLocalError, ValidationError
from builder.oci import Platform, layer_compression
from builder.pull import DEFAULT_CONCURRENCY, Puller
from builder.reference import parse as parse_reference
from builder.registry.auth import SecretStore, pull_secret_from_object
from builder.registry.hosts import HostPolicy, parse_endpoint, parse_endpoint_list
from builder.store import Store, layer_usage
from builder.units import human


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--platform", help="os/arch[/variant] to choose from multi-arch images (default: this host's).")
@click.option("-j", "--concurrency", type=click.IntRange(1, 64), default=DEFAULT_CONCURRENCY, show_default=True,
              help="Blobs downloaded in parallel.")
@registry_options
@timeout_option
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@output_option("json", "yaml")
@pass_ctx
def pull(ctx: Context, refs: tuple[str, ...], platform: str | None, concurrency: int, plain_http: tuple[str, ...],
         insecure: tuple[str, ...], ca_file: str | None, pull_secrets: tuple[str, ...], timeout: float | None,
         quiet: bool, output: str) -> None:
    """Pull images into the store, fetching only the blobs it does not hold."""
    references = [parse_reference(r) for r in refs]
    policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
    with pull_progress(quiet or output != "table") as progress:
        puller = Puller(ctx.store, policy, make_keychain(ctx, pull_secrets),
                        Platform.parse(platform) if platform else None, concurrency, on_event=progress,
                        retry=retry_policy(ctx, timeout))
        started = time.monotonic()
        result = puller.pull(references)
        elapsed = time.monotonic() - started
    if output != "table":
        emit({**pull_result_json(result), "seconds": round(elapsed, 3)}, output)
        return
    for img in result.images:
        click.echo(f"{img.name}  {img.descriptor.digest}")
    click.echo(f"fetched {human(result.bytes_fetched)} in {result.blobs_fetched} blobs, reused "
               f"{human(result.bytes_reused)} in {result.blobs_reused} blobs, {elapsed:.1f}s")


# -- layers ------------------------------------------------------------------------------


@click.group()
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
@output_option("json", "yaml")
@pass_ctx
def layers_list(ctx: Context, output: str) -> None:
    """Every stored layer: digest, size, media type, and the images that use it."""
    usage = layer_usage(ctx.store)
    rows = sorted(usage.values(), key=lambda u: (-u.descriptor.size, str(u.descriptor.digest)))
    if output != "table":
        emit([{"digest": str(u.descriptor.digest), "size": u.descriptor.size,
               "mediaType": u.descriptor.media_type, "present": u.present, "images": u.images}
              for u in rows], output)
        return
    click.echo(f"{'DIGEST':<19} {'SIZE':>10}  {'MEDIA TYPE':<48} IMAGES")
    for u in rows:
        click.echo(f"sha256:{u.descriptor.digest.short} {human(u.descriptor.size):>10}  "
                   f"{u.descriptor.media_type:<48} {', '.join(u.images)}")


@layers.command("inspect")
@click.argument("digest")
@output_option("json", "yaml")
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
    if output != "table":
        emit(info, output)
        return
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else ("-" if value is None else value)
        click.echo(f"{key + ':':<13} {shown}")


@layers.command("verify")
@output_option("json", "yaml")
@pass_ctx
def layers_verify(ctx: Context, output: str) -> None:
    """Rehash every stored blob; quarantine corrupt ones. Exits 4 if any was bad."""
    report = ctx.store.verify()
    if output != "table":
        emit({"checked": report.checked, "bytes": report.bytes, "corrupt": report.corrupt,
              "missing": report.missing, "ok": report.ok}, output)
    else:
        click.echo(f"checked {report.checked} blobs, {human(report.bytes)}")
        for d in report.corrupt:
            click.echo(f"corrupt {d} (moved to {ctx.store.home.quarantine})")
        for d in report.missing:
            click.echo(f"missing {d}")
    if not report.ok:
        sys.exit(ExitCode.DIGEST)


@click.command()
@click.option("--dry-run", is_flag=True, help="List what would be deleted and why; delete nothing.")
@output_option("json", "yaml")
@pass_ctx
def gc(ctx: Context, dry_run: bool, output: str) -> None:
    """Delete expired caches and the automatic caches over auto_max_bytes, then remove
    blobs, volumes and partial downloads nothing needs."""
    report = ctx.caches.gc(dry_run=dry_run)
    budget = ctx.caches.settings.auto_max_bytes
    if output != "table":
        doc = {"dryRun": dry_run, "cachesDeleted": report.deleted, "autoBytes": report.auto_bytes,
               "autoMaxBytes": budget,
               "caches": [{"name": r.name, "id": r.id, "cause": r.cause, "reason": r.reason, "bytes": r.bytes}
                          for r in report.retired],
               "blobsRemoved": report.blobs_removed, "bytesFreed": report.bytes_freed,
               "partialsRemoved": report.partials_removed, "volumesRemoved": report.volumes_removed}
        if dry_run:
            doc["volumeFiles"] = [{"path": path, "bytes": size} for path, size in report.volume_files]
            doc["blobs"] = [{"digest": digest, "bytes": size} for digest, size in report.blobs]
        emit(doc, output)
        return
    if dry_run:
        for r in report.retired:
            click.echo(f"would delete image cache {r.name} ({human(r.bytes)}): {r.reason}")
        for path, size in report.volume_files:
            click.echo(f"would remove orphan volume file {path} ({human(size)})")
        for digest, size in report.blobs:
            click.echo(f"would remove blob {digest} ({human(size)}): no image, cache or recent pull needs it")
        freed = sum(r.bytes for r in report.retired) + sum(s for _, s in report.volume_files) + report.bytes_freed
        _over_budget(report.auto_bytes, budget, "would still hold")
        click.echo(f"would free {human(freed)}: {_count(len(report.retired), 'cache')}, "
                   f"{_count(report.volumes_removed, 'orphan volume file')}, {_count(report.blobs_removed, 'blob')}; "
                   "nothing was deleted")
        return
    for r in report.retired:
        click.echo(f"deleted image cache {r.name}: {r.reason}")
    for name in sorted(set(report.deleted) - {r.name for r in report.retired}):
        click.echo(f"deleted expired image cache {name}")
    _over_budget(report.auto_bytes, budget, "still hold")
    click.echo(f"removed {report.blobs_removed} blobs ({human(report.bytes_freed)}), "
               f"{report.volumes_removed} volume files and {report.partials_removed} partial downloads")


def _over_budget(held: int, budget: int, verb: str) -> None:
    if held > budget > 0:
        click.echo(f"automatic caches {verb} {human(held)}, over auto_max_bytes ({human(budget)}): the rest were "
                   "used within the last hour or are being built")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- secrets ---------------------------------------------------------------------------------


@click.group()
def secret() -> None:
    """Named registry credentials (pull secrets), stored readable by you only."""


@secret.command("create")
@click.argument("name", metavar="NAMESPACE:NAME")
@click.option("--from-file", "from_file", metavar="FILE",
              help="A Kubernetes Secret (kubernetes.io/dockerconfigjson or dockercfg) or a docker config.json, "
                   "with credentials for one or more registries ('-' for stdin).")
@click.option("--registry", help="The registry endpoint (host or host:port).")
@click.option("--username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_ctx
def secret_create(ctx: Context, name: str, from_file: str | None, registry: str | None, username: str | None,
                  password_stdin: bool) -> None:
    """Store credentials under NAMESPACE:NAME: for one registry (--registry, --username,
    --password-stdin), or as a Secret or config.json file holds them (--from-file)."""
    if from_file is not None:
        if registry or username or password_stdin:
            raise ValidationError("--from-file takes the credentials from the file: drop --registry, --username "
                                  "and --password-stdin")
        from builder.cli.cache_cmds import load_documents  # YAML loading, only for this form

        SecretStore.split_name(name)
        documents = load_documents(from_file)
        if len(documents) != 1:
            raise ValidationError(f"{from_file}: want one Secret or config.json, found {len(documents)} documents")
        _, auths = pull_secret_from_object(documents[0], from_file)
        ctx.secrets.store(name, auths)
        click.echo(f"secret {name} stored for {', '.join(sorted(auths))}")
        return
    if registry is None or username is None or not password_stdin:
        raise ValidationError("give --registry, --username and --password-stdin, or --from-file")
    endpoint = parse_endpoint(registry, "--registry")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValidationError("no password on standard input")
    ctx.secrets.create(name, endpoint, username, password)
    click.echo(f"secret {name} stored for {endpoint}")


@secret.command("list")
@output_option("json", "yaml")
@pass_ctx
def secret_list(ctx: Context, output: str) -> None:
    """The names of stored secrets (never their contents)."""
    names = ctx.secrets.list()
    if output != "table":
        emit(names, output)
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


