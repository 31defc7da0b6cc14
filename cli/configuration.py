"""`config`: every AETHERCORE_* setting, its effective value, or the documentation formats."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, settings


def config_show(
    fmt: str = typer.Option(
        "table", "--format", help="table (effective values), env (.env.example) or markdown (README's table)"
    ),
) -> None:
    """Every AETHERCORE_* setting: its effective value, or the documentation formats."""
    from config.settings import SETTINGS

    if fmt == "env":
        print("# Every AetherCore setting with its default. Copy to .env and edit; docker compose reads .env.")
        for spec in SETTINGS:
            print(f"# {spec.doc}\n{spec.env}={spec.default}")
    elif fmt == "markdown":
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for spec in SETTINGS:
            print(f"| `{spec.env}` | `{spec.default}` | {spec.doc} |")
    else:
        cfg = settings()
        table = Table("variable", "value", "default")
        for spec in SETTINGS:
            value = getattr(cfg, spec.name)
            table.add_row(spec.env, str(value), spec.default)
        console.print(table)
