"""`aethercore`: the seed's own verbs (`heimnetz_cli.py aethercore info|health|models|load|unload|serve`), so its
documentation works as written with `manage.py` in their place. Each is the command it names elsewhere, with
the same options and output."""

from __future__ import annotations

import typer

from cli import models, serving, system

group = typer.Typer(
    help="The seed's verbs: info, health, models, load, unload, serve (aliases, same output).", no_args_is_help=True
)
group.command("info", help="AetherCore status: the same as `system status`.")(system.system_status)
group.command("health", help="Health checks: the same as `system health`.")(system.system_health)
group.command("models", help="Configured models: the same as `models list`.")(models.models_list)
group.command("load", help="Load a model: the same as `models load`.")(models.models_load)
group.command("unload", help="Unload a model: the same as `models unload`.")(models.models_unload)
group.command("serve", help="One inference request: the same as `serve`.")(serving.serve)
