"""The ``imc`` command: a thin shell over the library.

Each command parses its flags, makes one or two library calls, and renders the
result. Every ``ImcError`` becomes one line on stderr and the error's exit code.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from builder import __version__
from builder.cli import cache_cmds, store_cmds
from builder.cli.match_cmd import match
from builder.cli.serve_cmd import serve
from builder.cli.common import EXIT_USAGE, Context
from builder.errors import ImcError
from builder.store import default_home


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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



for command in (store_cmds.pull, store_cmds.layers, store_cmds.gc, store_cmds.secret, cache_cmds.cache,
                cache_cmds.apply, cache_cmds.volume, cache_cmds.config, match, serve):
    cli.add_command(command)


def main() -> None:
    """Entry point: run the CLI, turning every imc error into one line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except ImcError as e:
        click.echo(f"imc: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("imc: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("imc: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
