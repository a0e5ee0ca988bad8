"""``imc serve``: the registry endpoint and the ImageCache API in one process."""

from __future__ import annotations

import logging
import re
import signal
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import click
import yaml

from builder.cli.common import Context, make_keychain, pass_ctx, registry_options
from builder.errors import ValidationError
from builder.registry.hosts import HostPolicy, parse_endpoint_list
from builder.server.accesslog import JsonFormatter, TextFormatter
from builder.server.app import DRIFT_INTERVAL, MAX_CONNECTIONS, Server, parse_listen, tls_context
from builder.server.discovery import kubeconfig as kubeconfig_document
from builder.server.registry import pull_through_puller

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds from ``600``, ``90s``, ``10m``, ``1h`` or ``1h30m`` (as Go's durations
    read), for intervals given either way."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        found = _DURATION.fullmatch(text) if text else None
        if found is None or not any(found.groups()):
            raise ValidationError(f"{text!r} is not a duration: want seconds (600) or a duration such as 10m, "
                                  "90s or 1h30m") from None
        hours, minutes, secs = (float(g or 0) for g in found.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds >= 0 or seconds == float("inf"):
        raise ValidationError(f"{text!r} is not a duration: want 0 or more seconds")
    return seconds


class _Duration(click.ParamType):
    name = "SECONDS|DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float | int):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValidationError as e:
            self.fail(e.message, param, ctx)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the server the way Ctrl-C does."""
    raise KeyboardInterrupt


@click.command()
@click.option("--listen", default="127.0.0.1:5050", show_default=True,
              help="Address to serve on (port 0 picks a free one).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --listen address.")
@click.option("--pull-through", is_flag=True,
              help="On a miss, pull the image from a listed --upstream into the store, then serve it.")
@click.option("--upstream", "upstreams", multiple=True, metavar="HOST[:PORT]",
              help="A registry pull-through may connect to (repeatable, or comma-separated). A request's "
                   "?ns= must name one exactly; without ?ns= the first is used.")
@click.option("--stale-if-error/--no-stale-if-error", default=True, show_default=True,
              help="When an upstream cannot answer for a tag pull-through resolved before (unreachable, timed "
                   "out, 5xx, 404), serve the digest it last resolved, from the store; else pass the error on.")
@click.option("--offline", is_flag=True,
              help="Never contact an upstream: serve the caches, the store's images and the tags pull-through "
                   "recorded, nothing else (and check no tags for drift).")
@click.option("--sweep-interval", type=float, default=3600.0, show_default=True,
              help="Seconds between sweeps of expired caches (0: never).")
@click.option("--drift-interval", type=_Duration(), default=str(int(DRIFT_INTERVAL)), show_default="10m",
              help="How often every cache's tags are checked for drift (600, 10m, 1h; 0: never).")
@click.option("--api-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding the bearer token the ImageCache API asks every client for (without it, "
                   "the API answers loopback clients only).")
@click.option("--tls-cert", type=click.Path(path_type=Path),
              help="Serve HTTPS with this certificate (PEM, leaf first, then intermediates); needs --tls-key.")
@click.option("--tls-key", type=click.Path(path_type=Path),
              help="The unencrypted private key (PEM) of --tls-cert.")
@click.option("--max-connections", type=click.IntRange(min=1), default=MAX_CONNECTIONS, show_default=True,
              help="Connections served at once, watches included; past it a connection is answered 503 with "
                   "Retry-After.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Least severity logged; info logs each request (the access log).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines as text, or as one JSON object each.")
@registry_options
@pass_ctx
def serve(ctx: Context, listen: str, allow_remote: bool, pull_through: bool, upstreams: tuple[str, ...],
          stale_if_error: bool, offline: bool, sweep_interval: float, drift_interval: float,
          api_token_file: Path | None, tls_cert: Path | None, tls_key: Path | None, max_connections: int,
          log_level: str, log_format: str, plain_http: tuple[str, ...], insecure: tuple[str, ...],
          ca_file: str | None, pull_secrets: tuple[str, ...]) -> None:
    """Serve pulls from the caches (read-only OCI registry) and the ImageCache API.

    \b
    Who can make imc connect where (anyone who reaches the server: loopback only,
    unless --allow-remote):
    - the registry endpoint opens no connection, unless --pull-through is given;
      then a miss is fetched from the --upstream registries and only those: a ?ns=
      naming any other registry is answered 404 at once, and a redirect from a public
      upstream to a loopback, link-local or private address is refused; with
      --offline, no connection at all;
    - the ImageCache API builds the caches it is sent, pulling their images from
      the registries they name (as imc cache create does); with --api-token-file,
      only for clients that bear its token.

    With --tls-cert and --tls-key everything is served over HTTPS (TLS 1.2 or
    later), as kubectl needs to send a kubeconfig's token at all.
    """
    address = parse_listen(listen, allow_remote)
    listed = [e for item in upstreams for part in item.split(",") for e in sorted(parse_endpoint_list(part))]
    puller = None
    if pull_through and not offline:
        if not listed:
            raise ValidationError("--pull-through needs --upstream HOST[:PORT]: the registries it may pull from "
                                  "(a client of imc serve must not choose where it connects)")
        policy = HostPolicy(parse_endpoint_list(plain_http), parse_endpoint_list(insecure), ca_file)
        puller = pull_through_puller(ctx.store, policy, make_keychain(ctx, pull_secrets))
    token = read_token(api_token_file) if api_token_file else None
    if (tls_cert is None) != (tls_key is None):
        raise ValidationError("--tls-cert and --tls-key go together: give both, or neither")
    tls = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    server = Server(ctx.caches, address, puller, listed, sweep_interval, api_token=token,
                    max_connections=max_connections, drift_interval=0 if offline else drift_interval, tls=tls,
                    stale_if_error=stale_if_error, offline=offline)
    configure_log(log_level, log_format)
    signal.signal(signal.SIGTERM, _interrupt)
    base = server.url
    click.echo(f"serving on {base}\n  registry: {base}/v2/\n  API:      {base}/apis/eci.alibabacloud.com/v1/imagecaches"
               f"\n  metrics:  {base}/metrics\n  log:      stderr, {log_format}, level {log_level} "
               f"(each request at info)", err=True)
    if allow_remote and tls is None:
        log.warning("--allow-remote without --tls-cert: bearer tokens and registry traffic go in clear text, "
                    "and kubectl sends no token to an http:// server")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


def configure_log(level: str, log_format: str) -> None:
    """A server's log is the record of what it did: each request (the access log, at
    info), and what it did on its own (expired caches it deleted). Lines go to stderr."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
    wanted = logging.getLevelName(level.upper())
    # -v asks for everything; it stays in force under the default level.
    logging.getLogger("builder").setLevel(logging.DEBUG if root.level == logging.DEBUG else wanted)


def read_token(path: Path) -> str:
    """The API token: the file's one line, at least 16 characters, never echoed."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"--api-token-file {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ValidationError(f"--api-token-file {path}: want one line of at least 16 printable characters, no spaces")
    return token


@click.command()
@click.option("--listen", default="127.0.0.1:5050", show_default=True,
              help="The address imc serve listens on.")
@click.option("--api-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The token file imc serve was given: kubectl sends its token (over https only).")
@click.option("--tls-ca", type=click.Path(path_type=Path),
              help="The CA certificate (PEM) that signed imc serve's --tls-cert: the server is https://, "
                   "verified with this CA.")
@click.option("--server", "server_url", metavar="URL",
              help="The URL kubectl reaches imc serve at, when it is not --listen's address: a host name its "
                   "certificate names (https://node-7.example.com:5050). An https URL without --tls-ca is "
                   "verified with the system's CAs.")
def kubeconfig(listen: str, api_token_file: Path | None, tls_ca: Path | None, server_url: str | None) -> None:
    """Print a kubeconfig for kubectl to manage the caches through imc serve at --listen."""
    if server_url is not None:
        server, scheme = parse_server_url(server_url), urlsplit(server_url).scheme
        if tls_ca and scheme != "https":
            raise ValidationError(f"--tls-ca needs an https:// --server, not {server}")
    else:
        host, port = parse_listen(listen, allow_remote=True)
        if port == 0:
            raise ValidationError(f"--listen {listen!r}: give the port imc serve listens on, not 0")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # every address: reach it on loopback
        scheme = "https" if tls_ca else "http"
        server = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    if scheme == "https" and not api_token_file:
        # kubectl prompts for a user name and password for an https cluster whose user
        # entry is empty; imc serve takes only a bearer token.
        flag = "--tls-ca" if tls_ca else "an https --server"
        raise ValidationError(f"{flag} needs --api-token-file: over https kubectl sends the token, and without "
                              "one it asks for a user name and password that imc serve does not take")
    token = read_token(api_token_file) if api_token_file else None
    ca = read_ca(tls_ca) if tls_ca else None
    click.echo(yaml.safe_dump(kubeconfig_document(server, token, ca), sort_keys=False), nl=False)


def parse_server_url(text: str) -> str:
    """``http(s)://HOST[:PORT]``, nothing else (a path, query or user would reach
    kubectl as a cluster URL it cannot use): returned without a trailing slash."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, 0
    if parts is not None and (parts.username or parts.password):
        # Said without the URL: what follows the scheme may be a password.
        raise ValidationError("--server: a user or password in the URL is not used; kubectl sends the "
                              "--api-token-file token")
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port == 0
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValidationError(f"--server {text!r}: want http://HOST[:PORT] or https://HOST[:PORT]")
    return f"{parts.scheme}://{parts.netloc}"


def read_ca(path: Path) -> bytes:
    """The CA file's bytes, once checked to hold PEM certificates (kubectl would only
    say so at its first request)."""
    try:
        pem = path.read_bytes()
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):  # before OSError: SSLError is one
        raise ValidationError(f"--tls-ca {path}: not a PEM CA certificate") from None
    except OSError as e:
        raise ValidationError(f"--tls-ca {path}: cannot read it: {e.strerror}") from None
    return pem
