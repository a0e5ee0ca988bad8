"""``imc match``: which cache a container would use, and why."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from builder.cli.cache_cmds import load_documents, run_build
from builder.cli.common import Context, emit, output_option, pass_ctx
from builder.errors import NoMatchError, ValidationError
from builder.imagecache import ImageCache
from builder.matcher import Match, Matcher, MatchRequest, request_from_pod


def _workloads(documents: list[Any]) -> list[Any]:
    """The documents a request can come from: Pods and objects with a pod template."""
    def has_template(doc: Any) -> bool:
        spec = doc.get("spec") if isinstance(doc, dict) else None
        return isinstance(spec, dict) and (isinstance(spec.get("template"), dict) or
                                           isinstance(spec.get("jobTemplate"), dict))
    return [d for d in documents if isinstance(d, dict) and (d.get("kind") == "Pod" or has_template(d))]


def request_from_file(filename: str, instance_id: str | None) -> MatchRequest:
    """The request of the one Pod or workload in a YAML file (other kinds, such as a
    Service next to a Deployment, are skipped)."""
    documents = load_documents(filename)
    if not documents:
        raise ValidationError(f"{filename} holds no documents")
    workloads = _workloads(documents)
    if len(workloads) > 1:
        names = ", ".join(f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}" for d in workloads)
        raise ValidationError(f"{filename} holds {len(workloads)} workloads ({names}): want one")
    try:
        return request_from_pod(workloads[0] if workloads else documents[0], instance_id)
    except ValidationError as e:
        raise ValidationError(f"{filename}: {e.message}") from None


def _cache_json(cache: ImageCache | None) -> dict[str, Any] | None:
    return None if cache is None else {"name": cache.name, "imageCacheId": cache.id, "phase": cache.phase}


def _show(match: Match, cache: ImageCache | None, output: str) -> None:
    if output != "table":
        emit({"cache": _cache_json(cache), "reason": match.reason, "created": match.created,
              "warnings": list(match.warnings), "ranking": [c.to_json() for c in match.ranking]}, output)
        return
    if cache is not None:
        rows = [("NAME", "CACHEID", "PHASE"), (cache.name, cache.id, cache.phase)]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            click.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"reason: {match.reason}")
    if match.created and cache is not None and cache.phase != "Ready":
        click.echo(f"building in the background: imc cache get {cache.name}")


@click.command()
@click.option("-f", "--filename", help="Pod or Deployment YAML to take the request from ('-' for stdin).")
@click.option("--image", "images", multiple=True, metavar="REF", help="Image the container runs (repeatable; "
              "replaces the file's images).")
@click.option("--storage", "storage_gib", type=click.IntRange(min=0), metavar="GiB",
              help="Temporary storage the container declares (default: the file's ephemeral-storage, else 0).")
@click.option("--cache-id", metavar="ID", help="Use this cache (imc-…); it must exist and be Ready.")
@click.option("--auto/--no-auto", "auto", default=None,
              help="With no match, create an automatic cache from the request (default: the file's "
                   "k8s.aliyun.com/eci-image-cache annotation, else off).")
@click.option("--instance-id", metavar="ID", help="Names the automatic cache auto-create-for-ID "
              "(default: the pod's name).")
@click.option("--plain-http", multiple=True, metavar="LIST", help="Endpoints an automatic cache reaches over plain HTTP.")
@click.option("--insecure", multiple=True, metavar="LIST",
              help="Endpoints an automatic cache reaches over HTTPS without verification.")
@click.option("--pull-secret", "pull_secrets", multiple=True, metavar="NS:NAME",
              help="Stored pull secret an automatic cache uses.")
@click.option("--wait/--no-wait", default=False,
              help="Build an automatic cache in the foreground and return when Ready or Failed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display with --wait.")
@output_option("json", "yaml")
@pass_ctx
def match(ctx: Context, filename: str | None, images: tuple[str, ...], storage_gib: int | None,
          cache_id: str | None, auto: bool | None, instance_id: str | None, plain_http: tuple[str, ...],
          insecure: tuple[str, ...], pull_secrets: tuple[str, ...], wait: bool, quiet: bool, output: str) -> None:
    """Choose the image cache for a container: the best Ready match, a named cache, or
    (with auto-match) a new automatic cache.

    Exits 13 when no cache matches and auto-match is off.
    """
    request = request_from_file(filename, instance_id) if filename else MatchRequest(())
    if not filename and not images and not cache_id:
        raise ValidationError("nothing to match: give -f POD.yaml, or --image (and --storage), or --cache-id")
    request = dataclasses.replace(
        request,
        images=images or request.images,
        storage_gib=request.storage_gib if storage_gib is None else storage_gib,
        cache_id=cache_id or request.cache_id,
        auto_match=request.auto_match if auto is None else auto,
        instance_id=instance_id or request.instance_id,
        plain_http=(*request.plain_http, *plain_http),
        insecure=(*request.insecure, *insecure),
        pull_secrets=(*request.pull_secrets, *pull_secrets),
    )
    result = Matcher(ctx.caches).best(request)
    for warning in result.warnings:
        click.echo(f"imc: warning: {warning}", err=True)
    cache = result.cache
    if result.created and result.lease is not None and cache is not None:
        cache = run_build(ctx, cache, result.lease, wait, quiet or output != "table")
    _show(result, cache, output)
    if cache is None:
        raise NoMatchError(f"{result.reason}; --auto creates an automatic cache")
