"""Commands over image caches: cache, apply, volume and config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from builder.build import Builder
from builder.caches import UNSET, BuildLease, Caches, UpdatePlan, shown_value
from builder.cli.artifact_cmds import volume_pull, volume_push
from builder.cli.common import (
    Context,
    authfile_option,
    emit,
    emit_json,
    emit_yaml,
    output_option,
    pass_ctx,
    print_table,
    show,
    timeout_option,
)
from builder.cli.plan_view import show_plan, show_table
from builder.cli.progress import pull_progress
from builder.drift import DriftCheck
from builder.errors import AlreadyExistsError, BuildFailedError, CapacityError, ExitCode, ValidationError
from builder.export import FORMATS, OCI_ARCHIVE, export_archive, stream_archive
from builder.home import open_unlinked
from builder.imagecache import (
    FAILED,
    ON_DRIFT,
    SIZE_DEFAULT,
    UPDATE_FAILED,
    CacheSpec,
    ImageCache,
    Settings,
    spec_from_object,
    validate_name,
)
from builder.matcher import quantity_bytes
from builder.plan import plan
from builder.registry.auth import DockerConfig, pull_secret_from_object
from builder.units import human
from builder.volume import Volume

MAX_DOCUMENT_BYTES = 1 << 20


def run_build(ctx: Context, cache: ImageCache, lease: BuildLease, wait: bool, quiet: bool,
              timeout: float | None = None) -> ImageCache:
    """Build now (``--wait``: here, with progress) or in a detached builder process;
    its pull gives up after ``timeout`` seconds (default: the settings')."""
    if wait:
        with pull_progress(quiet) as progress:
            final = Builder(ctx.caches).build(cache.name, lease, on_pull=progress,
                                              on_event=None if progress is None else progress.cache_event,
                                              timeout=timeout)
        if final.phase in (FAILED, UPDATE_FAILED):
            raise BuildFailedError(f"image cache {final.name} is {final.phase}: {final.message}")
        return final
    ctx.home.logs.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_unlinked(ctx.home.build_log(cache.name), os.O_WRONLY | os.O_APPEND), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "builder", "--home", str(ctx.home.root), "cache", "build", cache.name,
             "--lease-fd", str(lease.fileno()), *(["--timeout", str(timeout)] if timeout is not None else [])],
            pass_fds=(lease.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    lease.release()  # the builder holds it now
    return cache


def on_drift_option(f: Callable) -> Callable:
    return click.option("--on-drift", type=click.Choice(ON_DRIFT),
                        help="What a moved tag does: ignore (report it: Stale, TagDrifted; the default) or "
                             "update (rebuild the cache from the tags' new digests).")(f)


def wait_options(f: Callable) -> Callable:
    f = click.option("-q", "--quiet", is_flag=True, help="No progress display with --wait.")(f)
    f = click.option("--wait/--no-wait", default=False,
                     help="Build in the foreground and return when Ready or Failed (default: in the background).")(f)
    return f


@click.group()
def cache() -> None:
    """Image caches: create, list, get, update, delete, events."""


def spec_options(f: Callable) -> Callable:
    """The flags that make a cache's spec: ``cache create`` and ``cache plan`` take the same."""
    for option in reversed((
        click.argument("name"),
        click.option("--image", "images", multiple=True, required=True, metavar="REF",
                     help="Image to cache (1 to 20)."),
        click.option("--size", "size_gib", type=int, default=SIZE_DEFAULT, show_default=True,
                     help="Size in GiB (20-32768)."),
        click.option("--retention-days", type=int, help="Delete the cache this many days after creation (1-65536)."),
        click.option("--reuse", is_flag=True, help="Copy layers other caches hold instead of downloading them."),
        click.option("--flash", is_flag=True, help="Usable from local staging as soon as the layers are local."),
        click.option("--plain-http", multiple=True, metavar="LIST", help="Endpoints to reach over plain HTTP."),
        click.option("--insecure", multiple=True, metavar="LIST",
                     help="Endpoints to reach over HTTPS without verification."),
        click.option("--pull-secret", "pull_secrets", multiple=True, metavar="NS:NAME",
                     help="Stored pull secret to use."),
        on_drift_option,
        timeout_option,
        authfile_option,
    )):
        f = option(f)
    return f


def _spec(images: tuple[str, ...], size_gib: int, retention_days: int | None, reuse: bool, flash: bool,
          plain_http: tuple[str, ...], insecure: tuple[str, ...], pull_secrets: tuple[str, ...],
          on_drift: str | None) -> CacheSpec:
    return CacheSpec(list(images), list(pull_secrets), size_gib, retention_days, reuse, flash,
                     list(plain_http), list(insecure), on_drift=on_drift or ON_DRIFT[0])


@cache.command("create")
@spec_options
@click.option("--dry-run", is_flag=True, help="Print the plan (as 'imc cache plan' does) and create nothing.")
@wait_options
@output_option("json", "yaml")
@pass_ctx
def cache_create(ctx: Context, name: str, images: tuple[str, ...], size_gib: int, retention_days: int | None,
                 reuse: bool, flash: bool, plain_http: tuple[str, ...], insecure: tuple[str, ...],
                 pull_secrets: tuple[str, ...], on_drift: str | None, timeout: float | None, dry_run: bool, wait: bool,
                 quiet: bool, output: str) -> None:
    """Create an image cache and build it: pull, check capacity, pack the volume."""
    spec = _spec(images, size_gib, retention_days, reuse, flash, plain_http, insecure, pull_secrets, on_drift)
    if dry_run:
        validate_name(name)
        if ctx.caches.exists(name):
            raise AlreadyExistsError(f"name {name!r}: an image cache with this name already exists")
        show_plan(plan(ctx.caches, spec, timeout=timeout), output, name)
        return
    created, lease = ctx.caches.create(name, spec)
    result = run_build(ctx, created, lease, wait, quiet or output != "table", timeout)
    if output == "table" and not wait:
        click.echo(f"imagecache {name} created ({created.id}); building in the background: imc cache get {name}")
        return
    show(result, output)


@cache.command("plan")
@spec_options
@output_option("json", "yaml")
@pass_ctx
def cache_plan(ctx: Context, name: str, images: tuple[str, ...], size_gib: int, retention_days: int | None,
               reuse: bool, flash: bool, plain_http: tuple[str, ...], insecure: tuple[str, ...],
               pull_secrets: tuple[str, ...], on_drift: str | None, timeout: float | None, output: str) -> None:
    """What building these images would fetch, reuse and unpack, and whether it fits;
    reads manifests and configs only, writes nothing. Exits 11 when it will not fit.
    For an existing NAME, what rebuilding it with these flags would do."""
    validate_name(name)
    spec = _spec(images, size_gib, retention_days, reuse, flash, plain_http, insecure, pull_secrets, on_drift)
    own = ctx.caches.get(name) if ctx.caches.exists(name) else None
    show_plan(plan(ctx.caches, spec, own, timeout=timeout), output, name)


@cache.command("build", hidden=True)
@click.argument("name")
@click.option("--lease-fd", type=int, required=True)
@click.option("--timeout", type=float)
@pass_ctx
def cache_build(ctx: Context, name: str, lease_fd: int, timeout: float | None) -> None:
    """(internal) The detached builder process started by create, update and apply."""
    Builder(ctx.caches).build(name, BuildLease.adopt(lease_fd), timeout=timeout)


@cache.command("list")
@output_option("wide", "json", "yaml")
@pass_ctx
def cache_list(ctx: Context, output: str) -> None:
    """Every cache: NAME AGE CACHEID PHASE PROGRESS (-o wide: LAST-USED HITS too)."""
    caches = ctx.caches.list()
    if output in ("json", "yaml"):
        doc = {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCacheList",
               "items": [c.to_object() for c in caches]}
        emit_json(doc) if output == "json" else emit_yaml(doc)
        return
    if caches:
        print_table(caches, wide=output == "wide")
    else:
        click.echo("No image caches.")


@cache.command("get")
@click.argument("name", metavar="NAME|ID")
@output_option("json", "yaml")
@pass_ctx
def cache_get(ctx: Context, name: str, output: str) -> None:
    """One cache, by name or id, with its last use and hits; -o yaml prints the
    ImageCache object with its status."""
    show(ctx.caches.find(name), output, wide=True)


@cache.command("events")
@click.argument("name", metavar="NAME|ID")
@output_option("json", "yaml")
@pass_ctx
def cache_events(ctx: Context, name: str, output: str) -> None:
    """A cache's events (by name or id), oldest first."""
    found = ctx.caches.find(name)
    if emit(found.to_object()["status"]["events"], output):
        return
    for e in found.events:
        click.echo(f"{e.time}  {e.type:<7}  {e.reason:<18}  {e.message}")


@cache.command("update")
@click.argument("name")
@click.option("--image", "images", multiple=True, metavar="REF", help="The new image list (replaces the old).")
@click.option("--size", "size_gib", type=int, help="New size in GiB: re-packs the volume (20-32768).")
@click.option("--retention-days", type=int, help="New retention period in days.")
@click.option("--no-retention", is_flag=True, help="Never expire.")
@click.option("--reuse/--no-reuse", default=None, help="Copy layers other caches hold (in later builds).")
@click.option("--flash/--no-flash", default=None, help="Usable from staging before packing (in later creations).")
@click.option("--plain-http", multiple=True, metavar="LIST")
@click.option("--insecure", multiple=True, metavar="LIST")
@click.option("--pull-secret", "pull_secrets", multiple=True, metavar="NS:NAME")
@on_drift_option
@timeout_option
@authfile_option
@wait_options
@output_option("json", "yaml")
@pass_ctx
def cache_update(ctx: Context, name: str, images: tuple[str, ...], size_gib: int | None, retention_days: int | None,
                 no_retention: bool, reuse: bool | None, flash: bool | None, plain_http: tuple[str, ...],
                 insecure: tuple[str, ...], pull_secrets: tuple[str, ...], on_drift: str | None, timeout: float | None,
                 wait: bool, quiet: bool, output: str) -> None:
    """Change images, size, retention, options or registry lists of a Ready or UpdateFailed cache."""
    retention: object = None if no_retention else (retention_days if retention_days is not None else UNSET)
    updated, lease = ctx.caches.update(name, list(images) or None, retention, list(plain_http) or None,
                                       list(insecure) or None, list(pull_secrets) or None, size_gib=size_gib,
                                       reuse=reuse, flash=flash, on_drift=on_drift)
    if lease is not None:
        updated = run_build(ctx, updated, lease, wait, quiet or output != "table", timeout)
    if output == "table" and lease is not None and not wait:
        click.echo(f"imagecache {name} updating in the background: imc cache get {name}")
        return
    show(updated, output)


@cache.command("check")
@click.argument("names", nargs=-1, metavar="[NAME|ID...]")
@output_option("json", "yaml")
@pass_ctx
def cache_check(ctx: Context, names: tuple[str, ...], output: str) -> None:
    """Ask the registries where each cache's tags point now (every cache when none is
    named): a moved tag makes the cache Stale. It keeps serving what it holds; one
    created or updated with --on-drift update is updated."""
    checks = DriftCheck(ctx.caches, lambda c, lease: run_build(ctx, c, lease, wait=False, quiet=True)).check(names)
    if emit([{"name": c.cache, "stale": c.stale, **({"skipped": c.skipped} if c.skipped else {}),
              **({"update": c.update} if c.update else {}),
              "images": [{"image": t.image, "state": t.state, "resolved": t.resolved, "current": t.current,
                          **({"error": t.error} if t.error else {})} for t in c.tags]} for c in checks], output):
        return
    if not checks:
        click.echo("No image caches.")
        return
    rows = [(c.cache, t.image, _short(t.resolved), _short(t.current) if t.current else "-", t.state)
            for c in checks for t in c.tags]
    if rows:
        header = ("NAME", "IMAGE", "BUILT FROM", "NOW", "STATE")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in [header, *rows]:
            click.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for c in checks:
        if c.skipped:
            click.echo(f"{c.cache}: not checked: {c.skipped}")
        for t in c.failed:
            click.echo(f"{c.cache}: cannot check {t.image}: {t.error}")
        if c.update == "started":
            click.echo(f"{c.cache}: updating to the tags' new digests (on-drift: update): imc cache get {c.cache}")
        elif c.update:
            click.echo(f"{c.cache}: on-drift update {c.update}")


def _short(digest: str) -> str:
    """``sha256:`` and 12 hex digits, as a table shows a digest."""
    return digest[:19]


@cache.command("delete")
@click.argument("names", nargs=-1, required=True, metavar="NAME|ID...")
@pass_ctx
def cache_delete(ctx: Context, names: tuple[str, ...]) -> None:
    """Delete caches (by name or id) in any phase; blobs nothing else needs go at the next gc."""
    for name in names:
        deleted = ctx.caches.delete(ctx.caches.find(name).name)
        click.echo(f"imagecache {deleted.name} deleted")


def load_documents(path: str) -> list[Any]:
    """The YAML (or JSON) documents of a file, or '-' for standard input."""
    if path == "-":
        text = sys.stdin.read(MAX_DOCUMENT_BYTES + 1)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as e:
            raise ValidationError(f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValidationError(f"{path} is not UTF-8 text") from None
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ValidationError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValidationError(f"{path} is not valid YAML{where}") from None


@click.command()
@click.option("-f", "--filename", required=True,
              help="YAML or JSON file with ImageCache objects and pull Secrets ('-' for stdin).")
@click.option("--dry-run", type=click.Choice(["client", "server"]), is_flag=False, flag_value="client", default=None,
              help="Print what would be created or changed, field by field; change nothing. "
                   "--dry-run=server also resolves the images and prints each cache's plan (exit 11 if one "
                   "will not fit).")
@authfile_option
@wait_options
@output_option("json", "yaml")
@pass_ctx
def apply(ctx: Context, filename: str, dry_run: str | None, wait: bool, quiet: bool, output: str) -> None:
    """Create or update the ImageCache objects in a file (several documents allowed),
    and store the pull Secrets in it (as kubectl prints them) before any cache needs them.

    Every document is validated before any is applied, so a bad file changes nothing.
    An existing cache takes the document's spec: every changed field takes effect (new
    images or a new size rebuild it, the old volume serving meanwhile), or the update
    is refused.
    """
    documents = load_documents(filename)
    if not documents:
        raise ValidationError(f"{filename} holds no documents")
    parsed = []
    pull_secrets = []
    for i, doc in enumerate(documents, 1):
        try:
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                pull_secrets.append(pull_secret_from_object(doc, filename))
            else:
                parsed.append(spec_from_object(doc))
        except ValidationError as e:
            raise ValidationError(f"document {i}: {e.message}") from None
    caches = ctx.caches
    # Every update is worked out before any document is applied: one refused changes
    # nothing, not even the Secrets of the same file (which the updates may name).
    provided = {ref for ref, _ in pull_secrets}
    plans = {name: caches.plan_update(name, spec, provided) for name, spec, _ in parsed if caches.exists(name)}
    for ref, auths in pull_secrets:
        assert ref is not None  # a Secret document always names itself
        if dry_run:
            click.echo(f"secret {ref} would be stored for {', '.join(sorted(auths))}")
            continue
        ctx.secrets.store(ref, auths)
        click.echo(f"secret {ref} stored for {', '.join(sorted(auths))}")
    if dry_run == "server":
        _plan_documents(ctx, parsed, plans, dict(pull_secrets), output)
        return
    for name, spec, no_effect in parsed:
        if name in plans:
            plan = plans[name]
            if dry_run:
                _print_plan(plan)
                continue
            updated, lease = caches.update_spec(name, spec)
            if lease is not None:
                run_build(ctx, updated, lease, wait, quiet)
                click.echo(f"imagecache {name} configured ({plan.rebuild})")
            else:
                click.echo(f"imagecache {name} {'configured' if plan.changes else 'unchanged'}")
        elif dry_run:
            click.echo(f"imagecache {name} would be created")
        else:
            created, lease = caches.create(name, spec, no_effect=no_effect)
            run_build(ctx, created, lease, wait, quiet)
            click.echo(f"imagecache {name} created ({created.id})")


def _plan_documents(ctx: Context, parsed: list[tuple[str, CacheSpec, Any]], updates: dict[str, UpdatePlan],
                    secrets: dict[str | None, dict[str, dict[str, str]]], output: str) -> None:
    """``apply --dry-run=server``: each cache's update (as ``--dry-run`` prints it) and its
    plan; CapacityError (exit 11) once every plan is shown if any will not fit."""
    given = {ref: DockerConfig.parse(json.dumps({"auths": auths}), f"pull secret {ref}")
             for ref, auths in secrets.items() if ref is not None}
    plans = []
    for name, spec, _ in parsed:
        own = updates[name].current if name in updates else None
        plans.append((name, plan(ctx.caches, spec, own, secrets=given)))
    if output in ("json", "yaml"):
        emit({"items": [{"name": name, **p.to_json()} for name, p in plans]}, output)
    else:
        for i, (name, p) in enumerate(plans):
            if i:
                click.echo()
            if name in updates:
                _print_plan(updates[name])
            else:
                click.echo(f"imagecache {name} would be created")
            show_table(p, name)
    unfit = [f"image cache {name}: {p.verdict()}" for name, p in plans if not p.fits]
    if unfit:
        raise CapacityError("; ".join(unfit))


def _print_plan(plan: UpdatePlan) -> None:
    name = plan.current.name
    if not plan.changes and not plan.rebuild:
        click.echo(f"imagecache {name} unchanged")
        return
    click.echo(f"imagecache {name} would be configured" + (f" ({plan.rebuild})" if plan.rebuild else ""))
    for what, old, new in plan.changes:
        click.echo(f"  {what}: {shown_value(old)} -> {shown_value(new)}")


@click.group()
def volume() -> None:
    """A cache's snapshot volume: inspect, verify, export, and push or pull it through a registry."""


volume.add_command(volume_push)
volume.add_command(volume_pull)


def open_volume(caches: Caches, name: str) -> Volume:
    """The packed volume of the cache with this name or id."""
    found = caches.find(name)
    if found.volume is None or found.volume_state != "ready":
        raise ValidationError(f"image cache {found.name} has no packed volume yet (phase {found.phase}, "
                              f"volume {found.volume_state})")
    return Volume.open(Path(found.volume.path))


@volume.command("inspect")
@click.argument("name", metavar="NAME|ID")
@output_option("json", "yaml")
@pass_ctx
def volume_inspect(ctx: Context, name: str, output: str) -> None:
    """The volume's header and index: capacity, blobs, encodings, sizes."""
    vol = open_volume(ctx.caches, name)
    blobs = [{"digest": str(e.digest), "size": e.size, "mediaType": e.media_type, "encoding": e.encoding,
              "storedBytes": e.length} for e in vol.entries.values()]
    info = {"path": str(vol.path), "created": vol.created, "capacityBytes": vol.capacity,
            "contentBytes": vol.content_bytes, "blobBytes": vol.blob_bytes, "images": vol.meta.get("images", []),
            "blobs": blobs}
    if emit(info, output):
        return
    click.echo(f"path:      {vol.path}\ncreated:   {vol.created}\ncapacity:  {human(vol.capacity)}\n"
               f"on disk:   {human(vol.content_bytes)} for {human(vol.blob_bytes)} of blobs")
    for image in vol.meta.get("images", []):
        click.echo(f"image:     {image['name']}  {image['digest']}")
    click.echo(f"{'DIGEST':<19} {'SIZE':>10} {'STORED':>10}  {'ENCODING':<8} MEDIA TYPE")
    for b in sorted(blobs, key=lambda b: -b["size"]):
        click.echo(f"{b['digest'][:19]} {human(b['size']):>10} {human(b['storedBytes']):>10}  "
                   f"{b['encoding']:<8} {b['mediaType']}")


@volume.command("verify")
@click.argument("name", metavar="NAME|ID")
@output_option("json", "yaml")
@pass_ctx
def volume_verify(ctx: Context, name: str, output: str) -> None:
    """Rehash every blob in the volume. Exits 4 if any is corrupt."""
    report = open_volume(ctx.caches, name).verify()
    if not emit({"checked": report.checked, "bytes": report.bytes, "corrupt": report.corrupt,
                 "ok": not report.corrupt}, output):
        click.echo(f"checked {report.checked} blobs, {human(report.bytes)}")
        for d in report.corrupt:
            click.echo(f"corrupt {d}")
    if report.corrupt:
        sys.exit(ExitCode.DIGEST)


@volume.command("export")
@click.argument("name", metavar="NAME|ID")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=OCI_ARCHIVE, show_default=True,
              help="docker-archive: every image with its tags, for docker load and podman load. "
                   "oci-archive: an OCI layout, for skopeo copy (and podman load of a single image).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The archive to write; '-' writes it to standard output, for a pipe.")
@click.option("--image", "images", multiple=True, metavar="REF",
              help="Export only this image of the cache (repeatable); default: all of them.")
@pass_ctx
def volume_export(ctx: Context, name: str, fmt: str, out: str, images: tuple[str, ...]) -> None:
    """Write the cache's images as one archive another tool loads.

    \b
      imc volume export web --format docker-archive -o web.tar && podman load -i web.tar
      imc volume export web --format docker-archive -o - | docker load
      imc volume export web -o web-oci.tar && skopeo copy oci-archive:web-oci.tar:REF DEST
    """
    vol = open_volume(ctx.caches, name)
    if out == "-":
        if sys.stdout.isatty():
            raise ValidationError("refusing to write an archive to a terminal: pipe it (-o - | podman load) "
                                  "or name a file with -o")
        exported = stream_archive(vol, fmt, sys.stdout.buffer, images)
        click.echo(f"wrote {fmt} to standard output: {', '.join(exported)}", err=True)
        return
    path = Path(out)
    exported = export_archive(vol, fmt, path, images)
    click.echo(f"wrote {path} ({human(path.stat().st_size)}): {', '.join(exported)}")


@click.group()
def config() -> None:
    """imc's settings: quotas, automatic-cache expiry and byte budget, pull bounds."""


@config.command("get")
@output_option("json", "yaml")
@pass_ctx
def config_get(ctx: Context, output: str) -> None:
    """Every setting and its value, and how many caches of each kind exist against
    their quota (what the hosted service's ListUsage reports)."""
    settings = Settings.load(ctx.home.settings)
    values: dict[str, Any] = {k: getattr(settings, k) for k in Settings.field_names()}
    values["max_auto_caches"] = settings.max_auto_caches
    caches = ctx.caches.list()
    auto = sum(1 for c in caches if c.auto)
    usage = {"manual": {"used": len(caches) - auto, "limit": settings.max_manual_caches},
             "automatic": {"used": auto, "limit": settings.max_auto_caches}}
    if not emit({**values, "usage": usage}, output):
        for k, v in values.items():
            click.echo(f"{k} = {v}")
        for kind, count in usage.items():
            click.echo(f"{kind} caches: {count['used']} of {count['limit']}")


@config.command("set")
@click.argument("key", type=click.Choice(Settings.field_names()))
@click.argument("text", metavar="VALUE")
@pass_ctx
def config_set(ctx: Context, key: str, text: str) -> None:
    """Set one setting: a whole number, or for auto_max_bytes a size (200G, 1.5T, 500Gi; 0: no budget)."""
    if key == "auto_max_bytes":
        value = quantity_bytes(text, key)
    elif text.isascii() and text.isdigit() and len(text) <= 18:
        value = int(text)
    else:
        raise ValidationError(f"{key}: {text!r} is not a whole number of 0 or more")
    settings = Settings.load(ctx.home.settings)
    setattr(settings, key, value)
    settings.save(ctx.home.settings)
    click.echo(f"{key} = {value}")

