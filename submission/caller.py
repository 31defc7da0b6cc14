"""What a caller may submit, by its role and grant: the rules admission asks (pure, no I/O). The caller itself, the
role groups and the lane and autoload rules are access/principal.py's; this adds what only submission asks.

May import: config/, tasks/, access/."""

from __future__ import annotations

from access.principal import MANAGE_MODELS, SERVE, Principal, allowed_lanes, may_autoload
from tasks.states import INFERENCE

__all__ = ["allowed_lanes", "limited_per_caller", "may_autoload", "roles_for"]


def roles_for(kind: str) -> tuple[str, ...]:
    """Who may submit each kind of job: inference SERVE, load and unload MANAGE_MODELS."""
    return SERVE if kind == INFERENCE else MANAGE_MODELS


def limited_per_caller(who: Principal | None) -> bool:
    """Whether `who` counts against the per-caller limits: everyone but an authenticated admin or operator."""
    return who is None or who.id == "anonymous" or who.role not in MANAGE_MODELS
