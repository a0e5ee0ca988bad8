"""``imc mirror-config``: point a container runtime's pulls at ``imc serve``.

Each runtime has its own way to say "ask this mirror first, then the registry":
containerd a ``hosts.toml`` per registry, Docker ``registry-mirrors`` in
``daemon.json`` (Docker Hub only), Podman a ``[[registry.mirror]]`` in
``registries.conf``. The snippets are generated, not hand-written, so that the
registry's upstream URL, the mirror's scheme and the TLS switches agree with how
``imc serve`` listens (plain HTTP, unless it sits behind a TLS proxy). Each snippet
names the ``imc serve --upstream`` flags that pull through from the same registries:
the mirror asks with ``?ns=<registry>``, and imc serve pulls only from those listed.
"""

from __future__ import annotations

import json

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


def containerd_hosts_toml(registry: str, server: str, insecure: bool = False) -> str:
    """``/etc/containerd/certs.d/<registry>/hosts.toml``: imc serve first for pull and
    resolve, the registry itself (``server``) for everything it does not hold."""
    registry = _registry(registry)
    scheme, address = parse_server(server)
    upstream = f"https://{DOCKER_HUB_API}" if registry == DOCKER_HUB else f"https://{registry}"
    lines = [
        f"# /etc/containerd/certs.d/{registry}/hosts.toml",
        '# containerd reads it when its CRI config has config_path = "/etc/containerd/certs.d".',
        f'server = "{upstream}"',
        "",
        f'[host."{scheme}://{address}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if scheme == "https" and insecure:
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


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


def podman_registries_conf(registry: str, server: str, insecure: bool = False) -> str:
    """A ``registries.conf`` snippet (v2 format): imc serve as the registry's mirror;
    ``insecure`` for plain HTTP, which Podman otherwise refuses."""
    registry = _registry(registry)
    scheme, address = parse_server(server)
    lines = [
        "# /etc/containers/registries.conf.d/imc.conf (or append to /etc/containers/registries.conf)",
        "[[registry]]",
        f'location = "{registry}"',
        "",
        "[[registry.mirror]]",
        f'location = "{address}"',
    ]
    if scheme == "http" or insecure:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


GENERATORS = {"containerd": containerd_hosts_toml, "docker": docker_daemon_json, "podman": podman_registries_conf}


def upstream_flags(registries: list[str]) -> str:
    """The ``imc serve`` flags that let pull-through fetch what these registries' mirrors miss."""
    return " ".join(f"--upstream {_registry(r)}" for r in registries)


def mirror_configs(runtime: str, registries: list[str], server: str, insecure: bool = False) -> str:
    """The snippets for every registry, in one text (Docker's in one daemon.json)."""
    if runtime == "docker":
        if len({_registry(r) for r in registries}) != 1:
            raise ValidationError("Docker's registry-mirrors apply only to Docker Hub: use --containerd or --podman "
                                  "to mirror several registries")
        return docker_daemon_json(registries[0], server, insecure)
    if runtime == "podman":
        parts = [podman_registries_conf(r, server, insecure) for r in registries]
        text = parts[0] + "".join("\n" + p.split("\n", 1)[1] for p in parts[1:])  # one file: one header
    else:
        text = "\n".join(containerd_hosts_toml(r, server, insecure) for r in registries)
    return text + f"\n# pull-through from the same registries: imc serve --pull-through {upstream_flags(registries)}\n"


@click.command("mirror-config")
@click.option("--containerd", "runtime", flag_value="containerd", help="Print a containerd hosts.toml.")
@click.option("--docker", "runtime", flag_value="docker", help="Print daemon.json keys (Docker Hub only).")
@click.option("--podman", "runtime", flag_value="podman", help="Print a registries.conf snippet.")
@click.option("--registry", "registries", multiple=True, metavar="HOST",
              help="A registry whose pulls imc serve answers first (repeatable; default docker.io). With "
                   "pull-through, list the same registries as imc serve --upstream.")
@click.option("--server", default=DEFAULT_SERVER, show_default=True, metavar="ADDR",
              help="Where imc serve listens: host:port (plain HTTP) or https://host:port.")
@click.option("--insecure", is_flag=True, help="With an https:// --server: do not verify its certificate.")
def mirror_config(runtime: str | None, registries: tuple[str, ...], server: str, insecure: bool) -> None:
    """Print the runtime configuration that sends pulls to imc serve first.

    What imc serve does not hold, the runtime fetches from the registry as before.
    """
    if runtime is None:
        raise click.UsageError("choose one of --containerd, --docker or --podman")
    click.echo(mirror_configs(runtime, list(registries) or [DOCKER_HUB], server, insecure), nl=False)
