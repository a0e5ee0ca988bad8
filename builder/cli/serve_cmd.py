"""``imc serve``: the registry endpoint and the ImageCache API in one process."""

from __future__ import annotations

import signal

import click
import yaml

from builder.cli.common import Context, make_keychain, pass_ctx, registry_options
from builder.errors import ValidationError
from builder.pull import Puller
from builder.registry.hosts import HostPolicy, parse_endpoint_list
from builder.server.app import Server, parse_listen
from builder.server.discovery import kubeconfig as kubeconfig_document


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the server the way Ctrl-C does."""
    raise KeyboardInterrupt


@click.command()
@click.option("--listen", default="127.0.0.1:5050", show_default=True,
              help="Address to serve on (port 0 picks a free one).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --listen address.")
@click.option("--pull-through", is_flag=True,
              help="On a miss, pull the image from its registry into the store, then serve it.")
@click.option("--upstream", metavar="HOST[:PORT]",
              help="Registry to pull through from when the request does not name one (?ns=).")
@click.option("--sweep-interval", type=float, default=3600.0, show_default=True,
              help="Seconds between sweeps of expired caches (0: never).")
@registry_options
@pass_ctx
def serve(ctx: Context, listen: str, allow_remote: bool, pull_through: bool, upstream: str | None,
          sweep_interval: float, plain_http: tuple[str, ...], insecure: tuple[str, ...], ca_file: str | None,
          pull_secrets: tuple[str, ...]) -> None:
    """Serve pulls from the caches (read-only OCI registry) and the ImageCache API."""
    address = parse_listen(listen, allow_remote)
    puller = None
    if pull_through:
        policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
        puller = Puller(ctx.store, policy, make_keychain(ctx, pull_secrets))
    if upstream is not None:
        (upstream,) = parse_endpoint_list(upstream)
    server = Server(ctx.caches, address, puller, upstream, sweep_interval)
    signal.signal(signal.SIGTERM, _interrupt)
    click.echo(f"serving on http://{server.address}  (registry: /v2/, API: /apis/eci.alibabacloud.com/v1/imagecaches)",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@click.command()
@click.option("--listen", default="127.0.0.1:5050", show_default=True,
              help="The address imc serve listens on.")
def kubeconfig(listen: str) -> None:
    """Print a kubeconfig for kubectl to manage the caches through imc serve at --listen."""
    host, port = parse_listen(listen, allow_remote=True)
    if port == 0:
        raise ValidationError(f"--listen {listen!r}: give the port imc serve listens on, not 0")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # every address: reach it on loopback
    server = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    click.echo(yaml.safe_dump(kubeconfig_document(server), sort_keys=False), nl=False)
