"""The ``imc`` command: a thin shell over the library.

Each command parses its flags, makes one or two library calls, and renders the
result. Every ``ImcError`` becomes one line on stderr and the error's exit code.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import click

from builder import __version__
from builder.cli.common import Context
from builder.errors import ExitCode, ImcError
from builder.home import default_home

# Each command's module is imported only when the command runs (or --help lists
# them): ``imc pull`` need not load the server, the volumes or SQLite.
COMMANDS = {
    "pull": "builder.cli.store_cmds:pull",
    "layers": "builder.cli.store_cmds:layers",
    "gc": "builder.cli.store_cmds:gc",
    "secret": "builder.cli.store_cmds:secret",
    "cache": "builder.cli.cache_cmds:cache",
    "apply": "builder.cli.cache_cmds:apply",
    "volume": "builder.cli.cache_cmds:volume",
    "config": "builder.cli.cache_cmds:config",
    "match": "builder.cli.match_cmd:match",
    "mirror-config": "builder.cli.mirror_cmd:mirror_config",
    "serve": "builder.cli.serve_cmd:serve",
    "kubeconfig": "builder.cli.serve_cmd:kubeconfig",
}


class LazyGroup(click.Group):
    """A group whose commands live in modules loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imc")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="IMC_HOME",
              help="imc's data directory (default: $IMC_HOME or ~/.local/share/imc).")
@click.option("-v", "--verbose", is_flag=True, help="Log requests and decisions to stderr.")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, verbose: bool) -> None:
    """imc builds image caches ahead of time so that no layer is pulled twice."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(home or default_home())



def main() -> None:
    """Entry point: run the CLI, turning every imc error into one line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except ImcError as e:
        click.echo(f"imc: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("imc: aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("imc: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(ExitCode.ERROR)
