"""Showing a cache's plan: a table people read, or the plan's JSON/YAML; exit 11 if it will not fit."""

from __future__ import annotations

import click

from builder.cli.common import emit
from builder.errors import CapacityError
from builder.plan import Plan
from builder.units import human


def show_plan(plan: Plan, output: str, name: str) -> None:
    """Print ``plan``; raise CapacityError (exit 11) after it when the images will not fit."""
    if not emit({"name": name, **plan.to_json()}, output):
        show_table(plan, name)
    if not plan.fits:
        raise CapacityError(f"image cache {name}: {plan.verdict()}")


def show_table(plan: Plan, name: str) -> None:
    header = ("IMAGE", "PLATFORM", "BLOBS", "TO FETCH", "IN STORE", "FROM CACHES", "UNPACKED")
    rows = []
    for image in plan.images:
        t = image.totals()
        rows.append((image.image, image.platform or "-", str(t.blobs), human(t.to_fetch), human(t.in_store),
                     human(t.from_caches), human(t.unpacked) + (" (estimated)" if t.unpacked_estimated else "")))
    total = plan.totals()
    rows.append(("TOTAL" + (" (shared blobs once)" if len(plan.images) > 1 else ""), "", str(total.blobs),
                 human(total.to_fetch), human(total.in_store), human(total.from_caches),
                 human(plan.unpacked) + (" (estimated)" if total.unpacked_estimated else "")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    click.echo(f"plan for image cache {name}:")
    for row in [header, *rows]:
        click.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"size:       {plan.verdict()}")
    if total.unpacked_estimated:
        ratios = ", ".join(f"{r.compression} x{r.value:.2f} ({r.source})" for r in plan.estimated_with())
        click.echo(f"estimate:   {human(total.unpacked_estimated)} of it from compression ratios: {ratios}")
    if total.in_other_caches:
        how = ("copied from them (reuse)" if plan.reuse else
               "fetched anyway; with reuse (--reuse, or the imc-enable-reuse annotation) copied instead")
        click.echo(f"caches:     {human(total.in_other_caches)} of it is in the volumes of "
                   f"{', '.join(sorted(total.caches))}; {how}")
    seconds = plan.seconds
    if total.to_fetch == 0:
        click.echo("time:       nothing to fetch")
    elif seconds is None:
        click.echo(f"time:       unknown: no pull in this home has measured a transfer rate yet "
                   f"({human(total.to_fetch)} to fetch)")
    else:
        click.echo(f"time:       about {_duration(seconds)} (estimated at {human(plan.rate or 0)}/s, the rate of "
                   "this home's recent pulls)")
    click.echo(f"plan read:  {human(plan.bytes_read)} of manifests and configs, no layer")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "1s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
