"""Roles: what each key may do inside its project (README, "Projects, roles and keys").

    admin     everything, in every project (with the `OpenAI-Project` header), and /admin
    member    read and write in its project: models, files, stores, jobs, evals, aliases, runs
    reviewer  read its project's stored completions and evals, give feedback and corrections
    reader    read its project's objects (and search its vector stores); no model calls

A service account (an internal app's key, not a person's) is a member or a reader.

Each route needs one permission; `needed` says which for the forwarded routes by method and
path, the gateway's own routes and the proxied ones name theirs. Nothing is allowed by
omission: a route not named here needs `WRITE`.
"""

from __future__ import annotations

from typing import Literal

from services.common.errors import PermissionDenied

Role = Literal["admin", "member", "reviewer", "reader"]
ROLES: tuple[Role, ...] = ("admin", "member", "reviewer", "reader")
SERVICE_ACCOUNT_ROLES = frozenset({"member", "reader"})

READ = "read"  # the project's objects, read (and vector store search)
REVIEW_READ = "review.read"  # stored completions and evals, read
REVIEW = "review"  # feedback and corrections on stored completions
WRITE = "write"  # everything else of the project: models called, objects made or changed
ADMIN = "admin"  # keys, projects, the audit log, exports; every project

GRANTS: dict[str, frozenset[str]] = {
    "admin": frozenset({READ, REVIEW_READ, REVIEW, WRITE, ADMIN}),
    "member": frozenset({READ, REVIEW_READ, REVIEW, WRITE}),
    "reviewer": frozenset({REVIEW_READ, REVIEW}),
    "reader": frozenset({READ, REVIEW_READ}),
}

# What a reviewer reads: stored completions (their messages) and evals (runs, output items).
_REVIEWED = ("/v1/chat/completions", "/v1/evals")
_UNDER_REVIEWED = tuple(p + "/" for p in _REVIEWED)


def needed(method: str, path: str) -> str:
    """The permission a request needs (the gateway's own routes state theirs as well)."""
    if path.startswith("/admin/"):
        return ADMIN
    if method in ("GET", "HEAD"):
        if path in _REVIEWED or path.startswith(_UNDER_REVIEWED):
            return REVIEW_READ
        return READ
    if method == "POST":
        if path.startswith("/v1/chat/completions/") and path.endswith("/feedback"):
            return REVIEW
        if path.startswith("/v1/vector_stores/") and path.endswith("/search"):
            return READ
    return WRITE


def allowed(permission: str) -> list[str]:
    """The roles holding `permission`."""
    return [role for role in ROLES if permission in GRANTS[role]]


def check(role: str, permission: str) -> None:
    """Raises 403 unless `role` holds `permission`."""
    if permission not in GRANTS[role]:
        raise PermissionDenied(
            f"This API key's role ({role}) does not allow this: it needs the `{permission}` "
            "permission. Ask an admin for a key with a role that has it.",
            code="insufficient_permissions",
        )
