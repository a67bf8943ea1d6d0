"""Model aliases at the gateway: a name an owner's apps call, routed by weight to its targets.

The finetune service owns aliases and their revisions; every gateway process keeps a copy,
refreshed every `alias_refresh_s` with a conditional GET (an unchanged table is a 304), so a
change applies everywhere within about a second, and the last copy stays in force while the
finetune service is away. Resolution on the request path is two dict lookups and a hash.

Sticky routing hashes (alias, identifier) to a point in [0, 1) and takes the target whose share
of the cumulative weights holds it: while the weights stand, an identifier stays on its target,
and a canary raised from 10% to 20% keeps the first 10% where they were.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any

import orjson
from pydantic import SecretStr

from services.common.errors import NotFound, Unavailable
from services.common.outbox import Outbox
from services.gateway.keys import ApiKey
from services.gateway.metrics import GatewayMetrics
from services.gateway.polled import Polled
from services.gateway.routing import Router

PIN = "@"  # "alias@target": one target of the alias, whatever its weight (0 included)


def _point(name: str, ident: str) -> float:
    digest = hashlib.blake2b(f"{name}\0{ident}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Alias:
    __slots__ = ("bounds", "card", "id", "models", "name", "owner", "revision", "sticky", "weights")

    def __init__(self, entry: dict[str, Any]) -> None:
        self.id: str = entry["id"]
        self.owner: str = entry["owner"]
        self.name: str = entry["name"]
        self.revision: int = int(entry["revision"])
        self.sticky: str = entry["sticky"]
        routes = entry["routes"]
        self.models: tuple[str, ...] = tuple(r["model"] for r in routes)
        self.weights: tuple[float, ...] = tuple(float(r["weight"]) for r in routes)
        total = sum(self.weights)
        running, bounds = 0.0, []
        for w in self.weights:
            running += w / total
            bounds.append(running)
        bounds[-1] = 1.0  # no point past the last bound, whatever the rounding
        self.bounds = tuple(bounds)
        self.card = {
            "id": self.name,
            "object": "model",
            "created": int(entry.get("created") or 0),
            "owned_by": self.owner,
            "alias": {"revision": self.revision, "routes": routes, "sticky": self.sticky},
        }

    def pick(self, ident: str | None) -> str:
        """The target for this identifier (None: a random draw by weight)."""
        # A traffic split, not a secret: the plain generator is the right one.
        point = random.random() if ident is None else _point(self.name, ident)  # noqa: S311
        return self.models[min(bisect.bisect_right(self.bounds, point), len(self.models) - 1)]

    def fallbacks(self, failed: str) -> list[str]:
        """The other weighted targets, heaviest first: where a request goes when its target is
        not being served (an adapter not loaded, a server down)."""
        pairs = sorted(zip(self.weights, self.models, strict=True), reverse=True)
        return [m for w, m in pairs if w > 0 and m != failed]


class AliasTable(Polled):
    path = "/internal/aliases"

    def __init__(self, finetune_url: str, token: SecretStr, refresh_s: float = 1.0) -> None:
        super().__init__(finetune_url, token, refresh_s)
        self.by_owner: dict[str, dict[str, Alias]] = {}

    def find(self, owner: str, model: str) -> tuple[Alias, str | None] | None:
        """The owner's alias a model id names, and the target it pins (if `alias@target`)."""
        mine = self.by_owner.get(owner)
        if not mine:
            return None
        alias = mine.get(model)
        if alias is not None:
            return alias, None
        if PIN in model:
            name, _, target = model.partition(PIN)
            alias = mine.get(name)
            if alias is not None and target in alias.models:
                return alias, target
        return None

    def of_owner(self, owner: str) -> list[Alias]:
        return list((self.by_owner.get(owner) or {}).values())

    def load(self, body: Any) -> None:
        table: dict[str, dict[str, Alias]] = {}
        for entry in body["data"]:
            table.setdefault(entry["owner"], {})[entry["name"]] = Alias(entry)
        self.by_owner = table


class AliasRouter:
    """Resolves an aliased request to its target, and reports each outcome (metrics, and the
    outbox stream the alias's guard reads)."""

    def __init__(
        self, table: AliasTable, router: Router, metrics: GatewayMetrics, outcomes: Outbox
    ) -> None:
        self.table = table
        self.router = router
        self.metrics = metrics
        self.outcomes = outcomes

    def find(self, owner: str, model: str) -> tuple[Alias, str | None] | None:
        """The alias a request names, unless a served model has that id (never shadowed)."""
        found = self.table.find(owner, model)
        if found is None or self.router.backends_for(model):
            return None
        return found

    def resolve(
        self, found: tuple[Alias, str | None], payload: dict[str, Any], key: ApiKey, out: Any
    ) -> tuple[bytes, str]:
        """The alias's target for this request, and the body that asks the engine for it. A
        chosen target no server has loaded is counted against it (its guard sees that) and the
        request goes to the heaviest target that is served: the alias keeps answering."""
        alias, pinned = found
        if not key.may_use(alias.name):
            raise NotFound(
                f"The model `{alias.name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        target = pinned
        if target is None:
            ident = None
            if alias.sticky == "user":
                ident = payload.get("safety_identifier") or payload.get("user") or key.id
            elif alias.sticky == "key":
                ident = key.id
            target = alias.pick(str(ident) if ident is not None else None)
            if not self.router.backends_for(target):
                served = [m for m in alias.fallbacks(target) if self.router.backends_for(m)]
                if not served:  # an outage, not the target's fault: nothing to count it against
                    raise Unavailable(
                        f"no target of the alias `{alias.name}` is being served now; "
                        "try again shortly"
                    )
                self.outcome(alias, target, 503, 0.0, unavailable=True)
                target = served[0]
        payload["model"] = target
        out.alias, out.model = alias, target
        out.served = (
            (b"x-crucible-model", target.encode()),
            (b"x-crucible-alias", f"{alias.name}; revision={alias.revision}".encode()),
        )
        return orjson.dumps(payload), target

    def outcome(
        self, alias: Alias, target: str, status: int, seconds: float, unavailable: bool = False
    ) -> None:
        self.metrics.alias_observe(alias, target, status, seconds, unavailable)
        meta = {
            "alias_id": alias.id,
            "revision": alias.revision,
            "target": target,
            "status": status,
            "ms": round(seconds * 1000, 3),
            "unavailable": unavailable,
        }
        self.outcomes.put(meta, b"", b"")
