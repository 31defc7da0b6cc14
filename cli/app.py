"""The root command and where each verb lives."""

from __future__ import annotations

import typer

from cli import aethercore, auth, configuration, context, jobs, models, processes, serving, system, webhooks

app = typer.Typer(
    help="AetherCore model serving: processes, models, inference and health.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for command in (
    processes.api,
    processes.worker,
    processes.flower,
    processes.dispatcher,
    processes.batches,
    processes.up,
    serving.serve,
):
    app.command()(command)
app.command("config")(configuration.config_show)
app.add_typer(auth.group, name="auth")
app.add_typer(models.group, name="models")
app.add_typer(system.group, name="system")
app.add_typer(jobs.group, name="jobs")
app.add_typer(webhooks.group, name="webhooks")
app.add_typer(aethercore.group, name="aethercore")
app.add_typer(context.group, name="context")
