"""The `family` command: one entry point for building, measuring and serving a family.

Each area owns its commands (plrd/commands.py, family/commands.py, server/commands.py); this module
only assembles them and turns a user-facing error into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from family.errors import FamilyError

app = typer.Typer(
    name="family",
    help="Build, measure and serve a family of low-rank members cut from one causal LM.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts hold literal brackets (hf:name[/config]), not rich markup
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Build, measure and serve a family of low-rank members cut from one causal LM."""


def _register() -> None:
    if app.registered_commands:  # already done in this process
        return
    from family import commands as family_commands
    from plrd import commands as plrd_commands
    from server import commands as server_commands

    for module in (plrd_commands, family_commands, server_commands):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except FamilyError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
