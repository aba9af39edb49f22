"""Commands of this area (registered on the `family` CLI)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
