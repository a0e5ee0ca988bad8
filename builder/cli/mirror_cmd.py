"""``imc mirror-config``: point a container runtime's pulls at ``imc serve``.

Each runtime has its own way to say "ask this mirror first, then the registry":
containerd a ``hosts.toml`` per registry, Docker ``registry-mirrors`` in
``daemon.json`` (Docker Hub only), Podman a ``[[registry.mirror]]`` in
``registries.conf``. The snippets are generated, not hand-written, so that the
registry's upstream URL, the mirror's scheme and the TLS switches agree with how
``imc serve`` listens (plain HTTP, unless it serves TLS: ``imc serve --tls-cert``). Each snippet
names the ``imc serve --upstream`` flags that pull through from the same registries:
the mirror asks with ``?ns=<registry>``, and imc serve pulls only from those listed.
containerd's files also carry what production needs: a private CA, a short dial timeout
so a stopped imc serve is skipped quickly, pull-only mode, and the ``_default`` namespace.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import click

from builder.errors import ValidationError
from builder.registry.hosts import parse_endpoint_list

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_SERVER = "127.0.0.1:5050"  # imc serve's default --listen


def _endpoint(text: str, what: str) -> str:
    endpoints = parse_endpoint_list(text)
    if len(endpoints) != 1:
        raise ValidationError(f"{what}: want one host or host:port, got {text!r}")
    return next(iter(endpoints))


def parse_server(text: str) -> tuple[str, str]:
    """``ADDR`` or ``http(s)://ADDR`` of ``imc serve``: (scheme, host:port). Plain HTTP
    unless a scheme says otherwise, since that is how ``imc serve`` listens."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme not in ("http", "https"):
        raise ValidationError(f"--server {text!r}: the scheme must be http or https")
    return scheme, _endpoint(rest.rstrip("/"), "--server")


def _registry(text: str) -> str:
    endpoint = _endpoint(text, "--registry")
    return DOCKER_HUB if endpoint in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API) else endpoint


DEFAULT_NAMESPACE = "_default"  # containerd's hosts directory for every registry without its own
DEFAULT_DIAL_TIMEOUT = "1s"
CONFIG_DIR = "/etc/containerd/certs.d"
_DURATION = re.compile(r"[1-9][0-9]*(ms|s|m)")


@dataclass(frozen=True)
class ContainerdOptions:
    """What a containerd ``[host]`` table says beyond the mirror's address.

    ``dial_timeout`` keeps a pull from hanging on a stopped imc serve before containerd
    falls back to the registry; ``pull_only`` leaves tag resolution to the registry, so a
    tag moved upstream is seen at once and imc serve answers the blobs alone.
    """

    ca_file: str | None = None
    dial_timeout: str | None = DEFAULT_DIAL_TIMEOUT
    pull_only: bool = False

    def __post_init__(self) -> None:
        if self.ca_file is not None and not self.ca_file.startswith("/"):
            raise ValidationError(f"--ca-file {self.ca_file!r}: give the absolute path on the node running containerd")
        if self.dial_timeout is not None and not _DURATION.fullmatch(self.dial_timeout):
            raise ValidationError(f"--dial-timeout {self.dial_timeout!r}: want a duration like 500ms, 1s or 1m")


def containerd_hosts_toml(registry: str, server: str, insecure: bool = False,
                          options: ContainerdOptions | None = None, plain_http: bool = False) -> str:
    """``/etc/containerd/certs.d/<registry>/hosts.toml``: imc serve first, the registry
    itself (``server``, ``http://`` when ``plain_http``) for everything imc serve does
    not hold or when it is down.
    ``_default`` is the namespace containerd uses for every registry without its own
    directory: it has no ``server`` line, so containerd falls back to the image's own registry."""
    options = options or ContainerdOptions()
    scheme, address = parse_server(server)
    if options.ca_file is not None and (scheme != "https" or insecure):
        raise ValidationError("--ca-file needs an https:// --server that is verified (not --insecure)")
    lines = [f"# {CONFIG_DIR}/{registry}/hosts.toml"]
    if registry != DEFAULT_NAMESPACE:
        registry = _registry(registry)
        lines[0] = f"# {CONFIG_DIR}/{registry}/hosts.toml"
        upstream = f"https://{DOCKER_HUB_API}" if registry == DOCKER_HUB else \
            f"{'http' if plain_http else 'https'}://{registry}"
        lines += [f'server = "{upstream}"', ""]
    capabilities = '["pull"]' if options.pull_only else '["pull", "resolve"]'
    lines += [f'[host."{scheme}://{address}"]', f"  capabilities = {capabilities}"]
    if options.ca_file is not None:
        lines.append(f'  ca = "{options.ca_file}"')
    if scheme == "https" and insecure:
        lines.append("  skip_verify = true")
    if options.dial_timeout is not None:
        lines.append(f'  dial_timeout = "{options.dial_timeout}"  # containerd 2.1 and later; 1.6, 1.7 and 2.0 ignore it')
    return "\n".join(lines) + "\n"


CONTAINERD_CONFIG = f"""\
# containerd reads these files when its config names their directory:
#   containerd 1.6/1.7 (config version 2): [plugins."io.containerd.grpc.v1.cri".registry] config_path = "{CONFIG_DIR}"
#   containerd 2.x (config version 3): [plugins."io.containerd.cri.v1.images".registry] config_path = "{CONFIG_DIR}"
#   ctr: ctr images pull --hosts-dir {CONFIG_DIR} IMAGE
"""


def docker_daemon_json(registry: str, server: str, insecure: bool = False) -> str:
    """The ``/etc/docker/daemon.json`` keys: ``registry-mirrors`` (which Docker applies
    to Docker Hub only), and ``insecure-registries`` for a plain-HTTP mirror."""
    if _registry(registry) != DOCKER_HUB:
        raise ValidationError(f"Docker's registry-mirrors apply only to Docker Hub, not {registry}: use "
                              "--containerd or --podman to mirror another registry")
    scheme, address = parse_server(server)
    doc: dict[str, list[str]] = {"registry-mirrors": [f"{scheme}://{address}"]}
    if scheme == "http" or insecure:
        doc["insecure-registries"] = [address]
    return json.dumps(doc, indent=2) + "\n"


def podman_registries_conf(registry: str, server: str, insecure: bool = False, plain_http: bool = False) -> str:
    """A ``registries.conf`` snippet (v2 format): imc serve as the registry's mirror;
    ``insecure`` for plain HTTP (the mirror's, or with ``plain_http`` the registry's),
    which Podman otherwise refuses."""
    registry = _registry(registry)
    scheme, address = parse_server(server)
    lines = [
        "# /etc/containers/registries.conf.d/imc.conf (or append to /etc/containers/registries.conf)",
        "[[registry]]",
        f'location = "{registry}"',
        *(["insecure = true"] if plain_http else []),
        "",
        "[[registry.mirror]]",
        f'location = "{address}"',
    ]
    if scheme == "http" or insecure:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


GENERATORS = {"containerd": containerd_hosts_toml, "docker": docker_daemon_json, "podman": podman_registries_conf}


def upstream_flags(registries: list[str], plain_http: frozenset[str] = frozenset()) -> str:
    """The ``imc serve`` flags that let pull-through fetch what these registries' mirrors miss."""
    upstreams = [_registry(r) for r in registries]
    return " ".join([f"--upstream {r}" for r in upstreams] + [f"--plain-http {r}" for r in upstreams if r in plain_http])


def mirror_configs(runtime: str, registries: list[str], server: str, insecure: bool = False,
                   options: ContainerdOptions | None = None, every_registry: bool = False,
                   plain_http: frozenset[str] = frozenset()) -> str:
    """The snippets for every registry, in one text (Docker's in one daemon.json).
    ``plain_http``: the registries among ``registries`` that speak plain HTTP."""
    if runtime != "containerd" and (options is not None or every_registry):
        raise ValidationError("--ca-file, --dial-timeout, --pull-only and --every-registry are containerd's: "
                              "use them with --containerd")
    named = {_registry(r) for r in registries}
    for endpoint in sorted(plain_http):
        if _registry(endpoint) not in named:
            raise ValidationError(f"--plain-http {endpoint}: not a --registry of this configuration")
        if _registry(endpoint) == DOCKER_HUB:
            raise ValidationError(f"--plain-http {endpoint}: Docker Hub is reached over HTTPS only")
    plain = frozenset(_registry(e) for e in plain_http)
    if runtime == "docker":
        if len({_registry(r) for r in registries}) != 1:
            raise ValidationError("Docker's registry-mirrors apply only to Docker Hub: use --containerd or --podman "
                                  "to mirror several registries")
        return docker_daemon_json(registries[0], server, insecure)
    if runtime == "podman":
        parts = [podman_registries_conf(r, server, insecure, _registry(r) in plain) for r in registries]
        text = parts[0] + "".join("\n" + p.split("\n", 1)[1] for p in parts[1:])  # one file: one header
    else:
        namespaces = registries + [DEFAULT_NAMESPACE] if every_registry else registries
        text = "\n".join(containerd_hosts_toml(r, server, insecure, options, r != DEFAULT_NAMESPACE and _registry(r) in plain)
                         for r in namespaces) + "\n" + CONTAINERD_CONFIG
    if not registries:
        return text + "# pull-through: imc serve --pull-through --upstream REGISTRY for each registry it may fetch from\n"
    separator = "" if runtime == "containerd" else "\n"
    return text + f"{separator}# pull-through from the same registries: imc serve --pull-through {upstream_flags(registries, plain)}\n"


@click.command("mirror-config")
@click.option("--containerd", "runtime", flag_value="containerd", help="Print containerd hosts.toml files.")
@click.option("--docker", "runtime", flag_value="docker", help="Print daemon.json keys (Docker Hub only).")
@click.option("--podman", "runtime", flag_value="podman", help="Print a registries.conf snippet.")
@click.option("--registry", "registries", multiple=True, metavar="HOST",
              help="A registry whose pulls imc serve answers first (repeatable; default docker.io). With "
                   "pull-through, list the same registries as imc serve --upstream.")
@click.option("--server", default=DEFAULT_SERVER, show_default=True, metavar="ADDR",
              help="Where imc serve listens: host:port (plain HTTP) or https://host:port.")
@click.option("--insecure", is_flag=True, help="With an https:// --server: do not verify its certificate.")
@click.option("--plain-http", "plain_http", multiple=True, metavar="LIST",
              help="Registries among --registry (host or host:port, comma-separated) that speak plain HTTP: "
                   "containerd's server is http://, Podman's registry insecure.")
@click.option("--ca-file", metavar="PATH",
              help="containerd: the CA certificate (path on the node) that signed an https:// --server's certificate.")
@click.option("--dial-timeout", metavar="DURATION",
              help=f"containerd 2.1+: give up connecting to imc serve after this long and ask the registry "
                   f"[default: {DEFAULT_DIAL_TIMEOUT}; 0 leaves it out].")
@click.option("--pull-only", is_flag=True,
              help="containerd: imc serve answers manifests by digest and blobs; tags are resolved by the registry.")
@click.option("--every-registry", is_flag=True,
              help=f"containerd: also print {CONFIG_DIR}/{DEFAULT_NAMESPACE}/hosts.toml, which sends every "
                   "registry without its own file through imc serve.")
def mirror_config(runtime: str | None, registries: tuple[str, ...], server: str, insecure: bool,
                  plain_http: tuple[str, ...], ca_file: str | None, dial_timeout: str | None, pull_only: bool,
                  every_registry: bool) -> None:
    """Print the runtime configuration that sends pulls to imc serve first.

    What imc serve does not hold, the runtime fetches from the registry as before.
    """
    if runtime is None:
        raise click.UsageError("choose one of --containerd, --docker or --podman")
    options = None
    if ca_file is not None or dial_timeout is not None or pull_only:
        timeout = DEFAULT_DIAL_TIMEOUT if dial_timeout is None else None if dial_timeout == "0" else dial_timeout
        options = ContainerdOptions(ca_file=ca_file, dial_timeout=timeout, pull_only=pull_only)
    chosen = list(registries) or ([] if every_registry else [DOCKER_HUB])
    click.echo(mirror_configs(runtime, chosen, server, insecure, options, every_registry,
                              parse_endpoint_list(plain_http)), nl=False)
