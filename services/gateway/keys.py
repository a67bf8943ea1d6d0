"""API keys: random secrets shown once, stored as SHA-256 hashes, each in a project, with a role
and limits. A key's `owner` is its project's id: what the services scope every object by."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Integer,
    String,
    false,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.common import migrations
from services.common.db import make_engine, make_sessionmaker
from services.common.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from services.common.tenancy import OWNER_RE
from services.gateway import audit
from services.gateway.budgets import MICRO, Budget, budgets_of
from services.gateway.roles import GRANTS, SERVICE_ACCOUNT_ROLES, Role
from services.gateway.tables import Base, ProjectRow

KEY_PREFIX = "sk-cru-"
# Names the key a Crucible service (the agent) acts for; honoured only with the internal token.
ON_BEHALF_HEADER = "x-crucible-key-id"


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # SHA-256 is right for a 256-bit random secret (no dictionary to guess from); it keeps the
    # lookup on the hot path a hash and a dict access.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    hint: Mapped[str] = mapped_column(String(16))  # the last 4 characters, to tell keys apart
    owner: Mapped[str] = mapped_column(String(128), index=True)  # the project's id
    name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16), default="member", server_default="member")
    # An internal app's key rather than a person's (a member or a reader).
    service_account: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Stored completions: kept when a request says nothing of `store` (off unless set), and
    # deleted this many days after they were made (None: kept until deleted).
    store: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Tokens, and micro-dollars, per UTC day or month (budgets.py); None: no budget of its own.
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_usd_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_period: Mapped[str] = mapped_column(String(8), default="month", server_default="month")
    # Written in batches (`KeyStore.aflush_used`), so at most that interval behind.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class ApiKey:
    """What the hot path needs to know about a key (never the secret)."""

    id: str
    owner: str  # the project it acts in
    models: frozenset[str] | None
    rpm: int
    max_concurrency: int
    role: str = "member"
    store: bool = False
    retention_days: int | None = None
    expires_at: float | None = None  # epoch seconds
    budgets: tuple[Budget, ...] = ()  # its own (tokens, dollars)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may(self, permission: str) -> bool:
        return permission in GRANTS[self.role]

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def usd(micros: int | None) -> float | None:
    return micros / MICRO if micros is not None else None


def usd_micros(dollars: float | None) -> int | None:
    return round(dollars * MICRO) if dollars is not None else None


def _datetime(epoch: int | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch is not None else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _epoch(at: datetime | None) -> int | None:
    """Seconds since the epoch (SQLite hands back naive datetimes: they are UTC)."""
    if at is None:
        return None
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def describe(row: ApiKeyRow) -> dict[str, Any]:
    """A key as listed: everything but the secret and its hash."""
    return {
        "id": row.id,
        "object": "api_key",
        "project_id": row.owner,
        "owner": row.owner,  # the same: what keys were created with before projects
        "name": row.name,
        "role": row.role,
        "service_account": row.service_account,
        "hint": f"{KEY_PREFIX}...{row.hint}",
        "models": row.models,
        "rpm": row.rpm,
        "max_concurrency": row.max_concurrency,
        "admin": row.role == "admin",
        "store": row.store,
        "retention_days": row.retention_days,
        "created_at": _epoch(row.created_at),
        "revoked_at": _epoch(row.revoked_at),
        "expires_at": _epoch(row.expires_at),
        "last_used_at": _epoch(row.last_used_at),
        "budget_tokens": row.budget_tokens,
        "budget_usd": usd(row.budget_usd_micros),
        "budget_period": row.budget_period,
    }


class KeyExpired(AuthenticationFailed):
    def __init__(self, at: float) -> None:
        when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        super().__init__(
            f"This API key expired at {when}; ask an admin to extend it.", code="expired_api_key"
        )


# --- what an admin may set on a key (the API and `crucible keys` check the same) ---------


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")  # false must not mean "unlimited"
    return value


Rpm = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_not_bool)]
Concurrency = Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_not_bool)]


def _future(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value <= time.time():
        raise ValueError("must be in the future (seconds since the epoch)")
    return value


Expiry = Annotated[  # up to the year 9999
    int, Field(le=253_402_300_799), AfterValidator(_future), BeforeValidator(_not_bool)
]
Retention = Annotated[int, Field(ge=1, le=36500), BeforeValidator(_not_bool)]
BudgetTokens = Annotated[int, Field(ge=1, le=10**15), BeforeValidator(_not_bool)]
# Dollars, kept to the micro-dollar (a budget of $0.000001 is the least).
BudgetUsd = Annotated[
    float, Field(ge=1e-6, le=1e9, allow_inf_nan=False), BeforeValidator(_not_bool)
]
Period = Literal["day", "month"]


class KeyUpdateRequest(BaseModel):
    """What `POST /admin/keys/{key_id}` may change: the fields sent, and only those (null
    resets a limit to the default, or removes the expiry)."""

    model_config = ConfigDict(extra="forbid")  # a typo must not silently drop a limit

    name: str = Field(default="", max_length=128)
    role: Role | None = None  # null: unchanged (a key always has a role)
    models: list[str] | None = None
    rpm: Rpm | None = None
    max_concurrency: Concurrency | None = None
    store: StrictBool = False  # store chat completions that do not say `store` themselves
    retention_days: Retention | None = None
    expires_at: Expiry | None = None  # seconds since the epoch; refused from then on
    budget_tokens: BudgetTokens | None = None  # per period (null: none of its own)
    budget_usd: BudgetUsd | None = None  # per period, at the gateway's price list (null: none)
    budget_period: Period = "month"  # a UTC day or month (both budgets)


ProjectId = Annotated[str, Field(min_length=1, max_length=128, pattern=OWNER_RE.pattern)]


class KeyCreateRequest(KeyUpdateRequest):
    """A new key: in `project_id` (an existing project), or `owner` (the project of that id,
    made if there is none: how keys were created before projects)."""

    project_id: ProjectId | None = None
    owner: ProjectId | None = None
    admin: StrictBool = False  # the same as role "admin"; "no" or 1 must never be a grant
    service_account: StrictBool = False

    @model_validator(mode="after")
    def _consistent(self) -> KeyCreateRequest:
        if self.project_id is None and self.owner is None:
            raise ValueError("project_id is required")
        if None not in (self.project_id, self.owner) and self.project_id != self.owner:
            raise ValueError("project_id and owner name the same thing: send one")
        if self.admin and self.role not in (None, "admin"):
            raise ValueError(f'admin: true contradicts role "{self.role}"')
        if self.service_account and self.role not in SERVICE_ACCOUNT_ROLES:
            raise ValueError('a service account\'s role is "member" (the default) or "reader"')
        return self

    def arguments(self) -> dict[str, Any]:
        """`KeyStore.create`'s arguments."""
        fields = self.model_dump(exclude={"project_id", "owner", "admin", "role"})
        role = self.role or ("admin" if self.admin else "member")
        project = self.project_id or self.owner
        return {**fields, "owner": project, "role": role, "make_project": self.project_id is None}


class KeyStore:
    """Keys in SQL (SQLite or PostgreSQL) with a short-lived in-memory cache for the hot path."""

    def __init__(
        self,
        url_or_engine: str | Engine,
        *,
        default_rpm: int = 600,
        default_max_concurrency: int = 32,
        cache_ttl: float = 5.0,
        internal_token: str | None = None,
    ) -> None:
        self.internal_token = internal_token
        self.engine = (
            make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        )
        migrations.upgrade(self.engine, "gateway")
        self.sessions = make_sessionmaker(self.engine)
        self.default_rpm = default_rpm
        self.default_max_concurrency = default_max_concurrency
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._used: dict[str, float] = {}
        self._projects: tuple[float, dict[str, tuple[Budget, ...]]] = (-1e9, {})

    def create(
        self,
        owner: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        rpm: int | None = None,
        max_concurrency: int | None = None,
        admin: bool = False,
        role: Role | None = None,
        service_account: bool = False,
        store: bool = False,
        retention_days: int | None = None,
        expires_at: int | None = None,
        budget_tokens: int | None = None,
        budget_usd: float | None = None,
        budget_period: str = "month",
        make_project: bool = True,
        actor: audit.Actor = audit.OPERATOR,
    ) -> tuple[str, dict[str, Any]]:
        """A new key in project `owner` (made, named after its id, when there is none and
        `make_project`): returns the secret (shown this once) and its description."""
        role = role or ("admin" if admin else "member")
        if service_account and role not in SERVICE_ACCOUNT_ROLES:
            raise InvalidRequest("a service account is a member or a reader", param="role")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id="key_" + secrets.token_hex(12),
            key_hash=hash_key(secret),
            hint=secret[-4:],
            owner=owner,
            name=name,
            role=role,
            service_account=service_account,
            models=models,
            rpm=rpm,
            max_concurrency=max_concurrency,
            store=store,
            retention_days=retention_days,
            created_at=datetime.now(UTC),
            expires_at=_datetime(expires_at),
            budget_tokens=budget_tokens,
            budget_usd_micros=usd_micros(budget_usd),
            budget_period=budget_period,
        )
        with self.sessions.begin() as s:
            project = s.get(ProjectRow, owner)
            if project is None and make_project:
                project = ProjectRow(id=owner, name=owner, created_at=row.created_at)
                s.add(project)
                audit.add(s, actor, "project.create", owner, {"name": owner})
            if project is None:
                raise NotFound(f"no project {owner!r}", param="project_id")
            if project.archived_at is not None:
                raise Conflict(f"project {owner!r} is archived", param="project_id")
            s.add(row)
            s.flush()
            info = describe(row)
            settings = {k: v for k, v in info.items() if k in KeyCreateRequest.model_fields}
            audit.add(s, actor, "key.create", row.id, settings)
        return secret, info

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Every key (revoked ones too), or a project's."""
        stmt = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        if owner is not None:
            stmt = stmt.where(ApiKeyRow.owner == owner)
        with self.sessions() as s:
            return [describe(row) for row in s.scalars(stmt)]

    def get(self, key_id: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            row = s.get(ApiKeyRow, key_id)
            return describe(row) if row is not None else None

    def update(
        self, key_id: str, changes: dict[str, Any], actor: audit.Actor = audit.OPERATOR
    ) -> dict[str, Any] | None:
        """Change a live key's `KeyUpdateRequest` fields (None resets a limit to the default, or
        removes an expiry); None if no live key has this id. This process applies it at once,
        other gateway processes within their cache TTL."""
        unknown = set(changes) - set(KeyUpdateRequest.model_fields)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        if "role" in changes and changes["role"] is None:
            raise InvalidRequest("role cannot be null", param="role")
        with self.sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if row.service_account and changes.get("role", row.role) not in SERVICE_ACCOUNT_ROLES:
                raise InvalidRequest("a service account is a member or a reader", param="role")
            for field, value in changes.items():
                if field == "budget_usd":
                    field, value = "budget_usd_micros", usd_micros(value)
                setattr(row, field, _datetime(value) if field == "expires_at" else value)
            s.flush()
            out = describe(row)
            audit.add(s, actor, "key.update", key_id, {k: out[k] for k in changes})
        self.forget()
        return out

    def forget(self) -> None:
        """Drop the cached keys and projects (after a change: this process applies it at once)."""
        self._cache.clear()
        self._projects = (-1e9, {})

    def write_used(self, used: dict[str, float]) -> None:
        """Record when each key was last used."""
        with self.sessions.begin() as s:
            for key_id, at in used.items():
                s.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.id == key_id)
                    .values(last_used_at=datetime.fromtimestamp(at, UTC))
                )

    async def aflush_used(self) -> int:
        """Write the last use of the keys used since the previous flush (the request path only
        notes it in memory); returns how many."""
        used, self._used = self._used, {}
        if used:
            await asyncio.to_thread(self.write_used, used)
        return len(used)

    def revoke(self, key_id: str, actor: audit.Actor = audit.OPERATOR) -> bool:
        with self.sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = datetime.now(UTC)
            audit.add(s, actor, "key.revoke", key_id)
        self.forget()  # this process stops honouring it at once; others within the TTL
        return True

    def lookup(self, secret: str) -> ApiKey | None:
        """The live key for a secret, from the cache when fresh (misses are cached too)."""
        digest = hash_key(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.cache_ttl:
            return hit[1]
        key = self._load(digest)
        if len(self._cache) > 10_000:  # bound the memory a flood of bad keys can take
            self._cache.clear()
        self._cache[digest] = (now, key)
        return key

    async def alookup(self, secret: str) -> ApiKey | None:
        """`lookup` for async code: a cache hit costs a hash; a miss goes to a thread."""
        hit = self._cache.get(hash_key(secret))
        if hit is not None and time.monotonic() - hit[0] < self.cache_ttl:
            return hit[1]
        return await asyncio.to_thread(self.lookup, secret)

    async def aresolve(
        self, secret: str, on_behalf_of: str | None, project: str | None = None
    ) -> ApiKey | None:
        """The key a request acts as: its own bearer secret, or, for a Crucible service holding
        the internal token (the agent), the key whose id it names. That key's project,
        allow-list and limits apply, and revoking it stops its runs. Raises KeyExpired past its
        expiry. `project` (the `OpenAI-Project` header) may differ from the key's own only for
        an admin key, which then acts in that project."""
        internal = self.internal_token
        admin = False
        if on_behalf_of is not None and internal and _same(secret, internal):
            key = await self.alookup_id(on_behalf_of)
            # Never admin: whoever holds the internal token must not be able to mint keys or
            # use every project's adapters by naming an admin key's id (ids are not secrets).
            if key is not None and key.is_admin:
                key, admin = replace(key, role="member"), True
        else:
            key = await self.alookup(secret)
            admin = key is not None and key.is_admin
        if key is None:
            return None
        now = time.time()
        if key.expires_at is not None and now >= key.expires_at:
            raise KeyExpired(key.expires_at)
        self._used[key.id] = now
        if project is not None and project != key.owner:
            if not admin:
                raise PermissionDenied(
                    f"This API key belongs to project {key.owner!r}, not {project[:128]!r}; "
                    "only an admin key may act in another project.",
                    code="mismatched_project",
                )
            if project not in await self._live_projects():
                raise NotFound(f"no active project {project[:128]!r}", code="project_not_found")
            key = replace(key, owner=project)
        return key

    async def _live_projects(self, max_age: float | None = None) -> dict[str, tuple[Budget, ...]]:
        """The projects not archived, with their budgets; cached like the keys (or younger
        than `max_age`)."""
        at, projects = self._projects
        if time.monotonic() - at >= (self.cache_ttl if max_age is None else max_age):
            stmt = select(ProjectRow).where(ProjectRow.archived_at.is_(None))

            def load() -> dict[str, tuple[Budget, ...]]:
                with self.sessions() as s:
                    return {
                        p.id: budgets_of(
                            "project", p.id, p.budget_tokens, p.budget_usd_micros, p.budget_period
                        )
                        for p in s.scalars(stmt)
                    }

            projects = await asyncio.to_thread(load)
            self._projects = (time.monotonic(), projects)
        return projects

    async def budgets(self, key: ApiKey) -> tuple[Budget, ...]:
        """The budgets a request of this key counts against: its own, its project's."""
        projects = await self._live_projects()
        if key.owner not in projects:  # a project made since the cache was filled
            projects = await self._live_projects(max_age=0.0)
        return key.budgets + projects.get(key.owner, ())

    async def alookup_id(self, key_id: str) -> ApiKey | None:
        """The live key with this id (for services acting on a key's behalf), cached like
        `alookup`."""
        slot = "id:" + key_id
        hit = self._cache.get(slot)
        if hit is None or time.monotonic() - hit[0] >= self.cache_ttl:
            stmt = select(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
            hit = (time.monotonic(), await asyncio.to_thread(self._load_by, stmt))
            self._cache[slot] = hit
        return hit[1]

    def _load(self, digest: str) -> ApiKey | None:
        stmt = select(ApiKeyRow).where(ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None))
        return self._load_by(stmt)

    def _load_by(self, stmt: Any) -> ApiKey | None:
        with self.sessions() as s:
            row = s.scalars(stmt).first()
        if row is None:
            return None
        return ApiKey(
            id=row.id,
            owner=row.owner,
            models=frozenset(row.models) if row.models is not None else None,
            rpm=row.rpm if row.rpm is not None else self.default_rpm,
            max_concurrency=row.max_concurrency or self.default_max_concurrency,
            role=row.role,
            store=row.store,
            retention_days=row.retention_days,
            expires_at=_epoch(row.expires_at),
            budgets=budgets_of(
                "key", row.id, row.budget_tokens, row.budget_usd_micros, row.budget_period
            ),
        )
