"""A caller (`Principal`), the role groups that may do each thing, and the rules about a caller that are not
HTTP: which priority lanes it may use, whether its request may load a model.

Roles: admin (everything), operator (load/unload, read everything), user (serve, batch, stream, its own jobs,
read models), viewer (read models and health). Priority lanes (`allowed_lanes`): a key's or token's own grant when
it has one, else its role's (AETHERCORE_PRIORITY_LANES; by default `high` only for admins and operators). Serving a
model that is not loaded loads it only for a caller who may manage models, or when the model is declared
`autoload: true` (`may_autoload`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config.lanes import LANES
from config.roles import ADMIN, OPERATOR, ROLES, USER

SERVE = (ADMIN, USER)
MANAGE_MODELS = (ADMIN, OPERATOR)
READ_MODELS = ROLES
READ_ALL_JOBS = (ADMIN, OPERATOR)
JOBS = (ADMIN, OPERATOR, USER)


@dataclass(frozen=True)
class Principal:
    id: str
    role: str
    lanes: frozenset[str] | None = None  # its own lane grant (a key's, a token's); None: its role's

    @property
    def sees_all_jobs(self) -> bool:
        return self.role in READ_ALL_JOBS


ANONYMOUS_ADMIN = Principal("anonymous", ADMIN)  # when AETHERCORE_AUTH=false


def lane_grant(lanes: Any) -> frozenset[str]:
    """A grant of priority lanes (names, or one comma-separated string) checked: ValueError unless it names one or
    more of LANES and nothing else."""
    names = lanes.split(",") if isinstance(lanes, str) else lanes
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"lanes must be a list of lane names from {', '.join(LANES)}")
    grant = frozenset(n.strip() for n in names if n.strip())
    if not grant or not grant <= set(LANES):
        raise ValueError(f"lanes must name one or more of {', '.join(LANES)}, got {sorted(grant)}")
    return grant


def allowed_lanes(who: Principal | None, by_role: dict[str, frozenset[str]]) -> frozenset[str]:
    """The priority lanes `who` may submit to: its own grant, else its role's (`by_role`,
    AETHERCORE_PRIORITY_LANES over the defaults); every lane for a role the setting leaves out."""
    if who is not None and who.lanes is not None:
        return who.lanes
    return by_role.get(who.role if who is not None else "", frozenset(LANES))


def may_autoload(who: Principal | None, autoload_declared: bool) -> bool:
    """Whether a request of `who` may load the model it serves (and so evict others' models): callers who manage
    models (admin, operator) may; everyone else only for a model declared `autoload: true` in models.yaml."""
    if autoload_declared:
        return True
    return who is not None and who.role in MANAGE_MODELS
