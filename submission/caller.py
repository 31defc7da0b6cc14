"""What a caller may submit, by its role and grant: the rules admission asks (pure, no I/O).

May import: config/, tasks/, submission/.
The Principal and the role groups move to access/ (helper C): these rules go with them at the merge."""

from __future__ import annotations

from config.roles import ADMIN, OPERATOR, USER
from submission.request import Caller
from tasks.names import LANES
from tasks.states import INFERENCE

# Who may submit each kind of job (api/auth.py SERVE and MANAGE_MODELS: the same groups).
SERVE_ROLES = (ADMIN, USER)
MANAGE_ROLES = (ADMIN, OPERATOR)


def roles_for(kind: str) -> tuple[str, ...]:
    return SERVE_ROLES if kind == INFERENCE else MANAGE_ROLES


def may_autoload(who: Caller | None, autoload_declared: bool) -> bool:
    """Whether a request of `who` may load the model it serves (and so evict others' models): callers who manage
    models (admin, operator) may; everyone else only for a model declared `autoload: true` in models.yaml."""
    if autoload_declared:
        return True
    return who is not None and who.role in MANAGE_ROLES


def allowed_lanes(who: Caller | None, by_role: dict[str, frozenset[str]]) -> frozenset[str]:
    """The priority lanes `who` may submit to: its own grant, else its role's (`by_role`,
    AETHERCORE_PRIORITY_LANES over the defaults); every lane for a role the setting leaves out."""
    if who is not None and who.lanes is not None:
        return who.lanes
    return by_role.get(who.role if who is not None else "", frozenset(LANES))


def limited_per_caller(who: Caller | None) -> bool:
    """Whether `who` counts against the per-caller limits: everyone but an authenticated admin or operator."""
    return who is None or who.id == "anonymous" or who.role not in MANAGE_ROLES
