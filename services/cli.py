"""`crucible`: the operator's command line.

    crucible projects create "Synthesis group" [--budget-tokens 50000000] [--budget-usd 200]
                                               [--budget-period month]
    crucible projects list [--all]                      --all: archived ones too
    crucible projects update PROJECT_ID [--name "New name"] [--budget-tokens N|none]
                                        [--budget-usd X|none]
    crucible projects archive PROJECT_ID                revokes its keys; its data stays
    crucible keys create --project proj_... [--role member|reviewer|reader|admin]
                         [--service-account] [--name laptop] [--models m1,m2] [--rpm 600]
                         [--max-concurrency 32] [--expires 2027-06-30]
                         [--budget-tokens 1000000] [--budget-usd 20] [--budget-period day|month]
    crucible keys create --owner alice ...              the project `alice`, made if missing
    crucible keys list [--project proj_...]
    crucible keys update KEY_ID [--role R] [--name N] [--models m1,m2|all] [--rpm 60|default]
                         [--max-concurrency 4|default] [--store|--no-store]
                         [--retention-days 30|none] [--expires 2027-06-30|never]
                         [--budget-tokens N|none] [--budget-usd X|none]
                         [--budget-period day|month]
    crucible keys revoke KEY_ID
    crucible audit [--limit 50] [--action key.update]   who changed what, newest first
    crucible usage [--month 2026-12] [--csv]            tokens per project and model
    crucible db upgrade [--schema gateway] [--revision head]
    crucible db current [--schema gateway]
    crucible db downgrade --schema agent --revision agent_0001
    crucible db revision --schema agent -m "what changed"   (for developers: a new migration)
    crucible backup DIR          every database, file and adapter of this deployment into DIR
    crucible restore DIR         into an empty deployment (Milvus is re-indexed from the files)
    crucible plan --profile gpu-ep [--max-model-len N]
    crucible plan --model DIR|config.json --gpus 5090,pro6000 [--tp 2] [--pp 1] [--dp 1] [--ep]
                  [--memory-fraction 0.9] [--max-model-len 32768] [--quantization fp8]

Keys are written to the gateway's database (CRUCIBLE_GATEWAY_DATABASE_URL, or SQLite under
CRUCIBLE_VAR_DIR); a running gateway sees a change or a revocation within its key cache TTL
(5 s). An expiry is a UTC date or date and time (ISO 8601).
`crucible db` finds each service's database the same way (CRUCIBLE_<SERVICE>_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from services.common.errors import CrucibleError
from services.gateway.budgets import PERIODS
from services.gateway.config import GatewaySettings
from services.gateway.keys import KeyCreateRequest, KeyStore, KeyUpdateRequest
from services.gateway.roles import ROLES


def _expiry(value: str) -> int | None:
    """`never`, or an ISO 8601 date or date and time (UTC unless it says otherwise)."""
    if value == "never":
        return None
    at = datetime.fromisoformat(value)
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def _or_none(convert: Any, none: str) -> Any:
    """An argument type: `none` (the default, unlimited, ...) is None, else `convert(value)`."""
    return lambda value: None if value == none else convert(value)


def _when(epoch: int | None) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M") if epoch else "-"


def _update(store: KeyStore, args: argparse.Namespace) -> int:
    fields = (
        "name",
        "role",
        "models",
        "rpm",
        "max_concurrency",
        "store",
        "retention_days",
        "expires",
        "budget_tokens",
        "budget_usd",
        "budget_period",
    )
    changes = {f: getattr(args, f) for f in fields if getattr(args, f) is not _UNSET}
    if "expires" in changes:
        changes["expires_at"] = changes.pop("expires")
    if not changes:
        print("nothing to change", file=sys.stderr)
        return 2
    try:
        checked = KeyUpdateRequest.model_validate(changes).model_dump(exclude_unset=True)
    except ValidationError as exc:
        print(exc, file=sys.stderr)
        return 2
    if _unpriced(checked.get("budget_usd")):
        return 2
    try:
        updated = store.update(args.key_id, checked)
    except CrucibleError as exc:
        print(f"crucible keys: {exc.message}", file=sys.stderr)
        return 2
    if updated is None:
        print(f"no active key {args.key_id}", file=sys.stderr)
        return 1
    print(json.dumps(updated, indent=2))
    return 0


_UNSET: Any = object()


def _unpriced(budget_usd: float | None) -> bool:
    """A dollar budget without the gateway's price list to count it by (said on stderr)."""
    if budget_usd is None or GatewaySettings().budget_prices:
        return False
    print(
        "a budget in dollars prices tokens by CRUCIBLE_GATEWAY_BUDGET_PRICES (USD per million "
        "tokens), which is not set: set it in the gateway's environment first",
        file=sys.stderr,
    )
    return True


def _keys(args: argparse.Namespace) -> int:
    store = KeyStore(GatewaySettings().db_url())
    try:
        if args.action == "create":
            models = [m for m in args.models.split(",") if m] if args.models else None
            try:
                asked = KeyCreateRequest(
                    project_id=args.project,
                    owner=args.owner,
                    role=args.role,
                    service_account=args.service_account,
                    name=args.name,
                    models=models,
                    rpm=args.rpm,
                    max_concurrency=args.max_concurrency,
                    admin=args.admin,
                    expires_at=args.expires,
                    budget_tokens=args.budget_tokens,
                    budget_usd=args.budget_usd,
                    budget_period=args.budget_period,
                )
            except ValidationError as exc:
                print(exc, file=sys.stderr)
                return 2
            if _unpriced(asked.budget_usd):
                return 2
            secret, info = store.create(**asked.arguments())
            print(json.dumps({**info, "key": secret}, indent=2))
            print("Store the key now: only its hash is kept.", file=sys.stderr)
        elif args.action == "list":
            for k in store.list(args.project):
                state = "revoked" if k["revoked_at"] else "active"
                kind = "  service-account" if k["service_account"] else ""
                print(
                    f"{k['id']}  {k['hint']}  project={k['project_id']}  {k['role']}{kind}"
                    f"  {state}  expires={_when(k['expires_at'])}"
                    f"  last-used={_when(k['last_used_at'])}  {k['name']}"
                )
        elif args.action == "update":
            return _update(store, args)
        elif not store.revoke(args.key_id):
            print(f"no active key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}")
    except CrucibleError as exc:  # an unknown or archived project, a role a key cannot have
        print(f"crucible keys: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.engine.dispose()
    return 0


def _projects(args: argparse.Namespace) -> int:
    from services.gateway.projects import ProjectCreate, Projects, ProjectUpdate

    store = KeyStore(GatewaySettings().db_url())
    projects = Projects(store)
    try:
        if args.action == "list":
            for p in projects.list(include_archived=args.all):
                print(f"{p['id']}  {p['status']}  created={_when(p['created_at'])}  {p['name']}")
        elif args.action == "create":
            budget = {
                "budget_tokens": args.budget_tokens,
                "budget_usd": args.budget_usd,
                "budget_period": args.budget_period,
            }
            if _unpriced(args.budget_usd):
                return 2
            made = projects.create(ProjectCreate(name=args.name, **budget))
            print(json.dumps(made, indent=2))
        elif args.action == "update":
            fields = ("name", "budget_tokens", "budget_usd", "budget_period")
            changes = {f: getattr(args, f) for f in fields if getattr(args, f) is not _UNSET}
            if _unpriced(changes.get("budget_usd")):
                return 2
            updated = projects.update(args.project_id, ProjectUpdate(**changes))
            print(json.dumps(updated, indent=2))
        else:
            print(json.dumps(projects.archive(args.project_id), indent=2))
    except CrucibleError as exc:
        print(f"crucible projects: {exc.message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        store.engine.dispose()
    return 0


def _audit(args: argparse.Namespace) -> int:
    from services.common.pagination import PageQuery
    from services.gateway.audit import AuditLog

    store = KeyStore(GatewaySettings().db_url())
    try:
        page = PageQuery(limit=args.limit, order="desc", after=None, before=None)
        events = AuditLog(store.sessions).events(page, args.action)
    finally:
        store.engine.dispose()
    for e in events["data"]:
        when = datetime.fromtimestamp(e["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = f"  {json.dumps(e['detail'], sort_keys=True)}" if e["detail"] else ""
        print(
            f"{when}  {e['action']:<15} {e['target']}  by {e['actor']} ({e['actor_owner']}){detail}"
        )
    return 0


def _usage(args: argparse.Namespace) -> int:
    """A month's usage and cost per project, model and kind, from the finetune service's
    records, priced by its cost model (the `CRUCIBLE_FINETUNE_COST_*` settings)."""
    import csv

    from services.backup import Deployment
    from services.common.db import make_engine, make_sessionmaker
    from services.finetune.config import FinetuneSettings
    from services.finetune.usage import UsageStore, report

    first = datetime.strptime(args.month, "%Y-%m").replace(tzinfo=UTC)
    after = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    engine = make_engine(Deployment.from_settings().databases["finetune"])
    prices = FinetuneSettings()
    try:
        rows = report(
            UsageStore(make_sessionmaker(engine)),
            int(first.timestamp()),
            int(after.timestamp()),
            prices.engine_usd_per_second(),
            prices.cost_hosted_prices,
        )
    finally:
        engine.dispose()
    if args.csv:
        out = csv.DictWriter(sys.stdout, fieldnames=list(USAGE_FIELDS), lineterminator="\n")
        out.writeheader()
        out.writerows(rows)
        return 0

    def usd(value: float | None) -> str:
        return "-" if value is None else f"{value:,.2f}"

    print(
        f"{'project':<24} {'model':<32} {'kind':<12} {'requests':>9} {'in':>12} {'out':>12} "
        f"{'engine s':>10} {'cost $':>10} {'hosted $':>10}"
    )
    for r in rows:
        seconds = "-" if r["engine_seconds"] is None else f"{r['engine_seconds']:,.1f}"
        print(
            f"{r['project_id'][:24]:<24} {r['model'][:32]:<32} {r['kind'][:12]:<12} "
            f"{r['requests']:>9,} {r['input_tokens']:>12,} {r['output_tokens']:>12,} "
            f"{seconds:>10} {usd(r['cost_usd']):>10} {usd(r['hosted_usd']):>10}"
        )
    served = [r for r in rows if r["kind"] in ("completions", "embeddings")]
    priced = [r for r in rows if r["cost_usd"] is not None]  # runs are within completions
    hosted = [r["hosted_usd"] for r in priced if r["hosted_usd"] is not None]
    print(
        f"{'total ' + args.month:<71} {'':>9} {sum(r['input_tokens'] for r in served):>12,} "
        f"{sum(r['output_tokens'] for r in served):>12,} "
        f"{sum(r['engine_seconds'] or 0.0 for r in priced):>10,.1f} "
        f"{usd(sum(r['cost_usd'] for r in priced)):>10} {usd(sum(hosted) if hosted else None):>10}"
    )
    return 0


USAGE_FIELDS = (
    "project_id",
    "model",
    "kind",
    "requests",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "engine_seconds",
    "cost_usd",
    "hosted_usd",
)


def _trace(args: argparse.Namespace) -> int:
    """A trace from the native stack's sink (services/traces.py): each span under its parent."""
    from services.traces import SpanStore, TraceSettings, tree

    path = TraceSettings().db_path()
    if not path.exists():
        print(f"no traces recorded yet ({path} is missing)", file=sys.stderr)
        return 1
    store = SpanStore(path)
    try:
        spans = store.trace(args.trace_id)
    finally:
        store.close()
    if not spans:
        print(
            f"no spans of trace {args.trace_id} (yet: spans arrive within a second)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(spans, indent=2))
        return 0
    print(f"{'start':>13} {'duration':>13} | service: span")
    print("\n".join(tree(spans)))
    return 0


def _db(args: argparse.Namespace) -> int:
    from services.backup import Deployment
    from services.common import migrations
    from services.common.db import make_engine

    if args.action == "revision":
        print(migrations.revision(args.schema, args.message))
        return 0
    databases = Deployment.from_settings().databases  # what each service would open
    for schema in [args.schema] if args.schema else list(migrations.SCHEMAS):
        engine = make_engine(databases[schema])
        try:
            if args.action == "upgrade":
                migrations.upgrade(engine, schema, args.revision or "head")
            elif args.action == "downgrade":
                migrations.downgrade(engine, schema, args.revision)
            at, head = migrations.current(engine, schema), migrations.head(schema)
            print(f"{schema}: {at or 'empty'}" + ("" if at == head else f" (head: {head})"))
        finally:
            engine.dispose()
    return 0


def _backup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services import backup

    dep = backup.Deployment.from_settings()
    try:
        if args.command == "backup":
            manifest = backup.backup(dep, Path(args.dir))
        else:
            manifest = backup.restore(dep, Path(args.dir))
    except backup.BackupError as exc:
        print(f"crucible {args.command}: {exc}", file=sys.stderr)
        return 1
    for schema, info in manifest["schemas"].items():
        print(f"{schema}: {sum(info['rows'].values())} rows at {info['revision']}")
    if args.command == "restore":
        print("retrieval re-indexes every vector store file when it starts", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from services.inference import planner, profiles

    models_dir = Path(args.models_dir)
    try:
        if args.profile:
            profile = profiles.load(args.profile)
            shape, gpus, layout, s = planner.from_profile(profile, models_dir, args.max_model_len)
            title = f"profile {profile.name}: {profile.model}"
        else:
            if not (args.model and args.gpus):
                print("crucible plan: --profile, or --model with --gpus", file=sys.stderr)
                return 2
            path = planner.config_path(args.model, models_dir)
            name = Path(args.model).stem if args.model.endswith(".json") else Path(args.model).name
            shape = planner.Shape.from_config(path, name)
            if args.quantization:
                shape = replace(shape, quant=args.quantization)
            gpus = args.gpus.split(",")
            layout = planner.Layout(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
            s = planner.Settings(
                memory_fraction=args.memory_fraction, max_model_len=args.max_model_len or 8192
            )
            title = f"{shape.name} on {args.gpus}"
        plan = planner.plan(shape, gpus, layout, s, title)
    except (planner.PlanError, profiles.ProfileError) as exc:
        print(f"crucible plan: {exc}", file=sys.stderr)
        return 2
    print(f"{shape.name}: {shape.total_params() / 1e9:.2f}B parameters")
    print(planner.render(plan))
    if len(plan.rows) > 1 or not plan.fits:
        others = planner.alternatives(shape, gpus, layout, s) if gpus else []
        if others:
            print("\nAlternatives:")
            for other in others:
                print("  " + planner.summary(other))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible", description="Operate a Crucible platform.")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create")
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", help="the project's id (crucible projects list)")
    where.add_argument("--owner", help="the project of this id, made if there is none")
    create.add_argument("--role", choices=ROLES, help="default: member (admin with --admin)")
    create.add_argument("--service-account", action="store_true", help="an internal app's key")
    create.add_argument("--name", default="")
    create.add_argument("--models", help="comma-separated allow-list (default: every model)")
    create.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    create.add_argument("--max-concurrency", type=int)
    create.add_argument("--admin", action="store_true")
    create.add_argument("--expires", type=_expiry, help="a UTC date or date and time")
    create.add_argument("--budget-tokens", type=int, help="tokens per period (default: none)")
    create.add_argument(
        "--budget-usd", type=float, help="dollars per period, at the gateway's prices"
    )
    create.add_argument("--budget-period", choices=PERIODS, default="month")
    upd = ksub.add_parser("update", help="change a key without reissuing it")
    upd.add_argument("key_id")
    upd.set_defaults(**dict.fromkeys(("name", "models", "rpm", "max_concurrency"), _UNSET))
    upd.set_defaults(store=_UNSET, retention_days=_UNSET, expires=_UNSET)
    upd.set_defaults(budget_tokens=_UNSET, budget_usd=_UNSET, budget_period=_UNSET)
    upd.add_argument("--name")
    upd.add_argument("--role", choices=ROLES, default=_UNSET)
    all_models = _or_none(lambda v: [m for m in v.split(",") if m], "all")
    upd.add_argument("--models", type=all_models, help="comma-separated, or all")
    upd.add_argument("--rpm", type=_or_none(int, "default"), help="per minute (0: no limit)")
    upd.add_argument("--max-concurrency", type=_or_none(int, "default"))
    upd.add_argument("--store", action=argparse.BooleanOptionalAction)
    upd.add_argument("--retention-days", type=_or_none(int, "none"))
    upd.add_argument("--expires", type=_expiry, help="a UTC date or date and time, or never")
    upd.add_argument("--budget-tokens", type=_or_none(int, "none"), help="per period, or none")
    upd.add_argument("--budget-usd", type=_or_none(float, "none"), help="per period, or none")
    upd.add_argument("--budget-period", choices=PERIODS)
    lst = ksub.add_parser("list")
    lst.add_argument("--project", "--owner", help="only this project's keys")
    revoke = ksub.add_parser("revoke")
    revoke.add_argument("key_id")
    projects = sub.add_parser("projects", help="create, list, update and archive projects")
    psub = projects.add_subparsers(dest="action", required=True)
    pcreate = psub.add_parser("create")
    pcreate.add_argument("name")
    pcreate.add_argument("--budget-tokens", type=int, help="tokens per period, all its keys")
    pcreate.add_argument("--budget-usd", type=float, help="dollars per period, all its keys")
    pcreate.add_argument("--budget-period", choices=PERIODS, default="month")
    psub.add_parser("list").add_argument("--all", action="store_true", help="archived too")
    pupd = psub.add_parser("update", help="rename it, or change its budget")
    pupd.add_argument("project_id")
    pupd.set_defaults(name=_UNSET, budget_tokens=_UNSET, budget_usd=_UNSET, budget_period=_UNSET)
    pupd.add_argument("--name")
    pupd.add_argument("--budget-tokens", type=_or_none(int, "none"), help="per period, or none")
    pupd.add_argument("--budget-usd", type=_or_none(float, "none"), help="per period, or none")
    pupd.add_argument("--budget-period", choices=PERIODS)
    psub.add_parser("archive", help="revoke its keys; its data stays").add_argument("project_id")
    use = sub.add_parser("usage", help="a month's tokens and cost per project and model")
    use.add_argument("--month", default=datetime.now(UTC).strftime("%Y-%m"), help="YYYY-MM (UTC)")
    use.add_argument("--csv", action="store_true", help="CSV instead of a table")
    tr = sub.add_parser("trace", help="a trace's spans as a tree, with timings")
    tr.add_argument("trace_id", help="32 hex digits (a response's x-trace-id header)")
    tr.add_argument("--json", action="store_true", help="the spans as JSON instead")
    aud = sub.add_parser("audit", help="the audit log: who changed what, newest first")
    aud.add_argument("--limit", type=int, default=50, choices=range(1, 101), metavar="1-100")
    aud.add_argument("--action", help="only this action (key.create, alias.promote, ...)")
    db = sub.add_parser("db", help="database migrations: upgrade, current, downgrade, revision")
    dsub = db.add_subparsers(dest="action", required=True)
    schemas = ["gateway", "retrieval", "finetune", "agent"]
    for action in ("upgrade", "current"):
        p = dsub.add_parser(action)
        p.add_argument("--schema", choices=schemas, help="one service's database (default: all)")
        p.add_argument("--revision", help=argparse.SUPPRESS if action == "current" else "head")
    down = dsub.add_parser("downgrade")
    down.add_argument("--schema", choices=schemas, required=True)
    down.add_argument("--revision", required=True, help="the revision to go back to, or base")
    rev = dsub.add_parser("revision")
    rev.add_argument("--schema", choices=schemas, required=True)
    rev.add_argument("-m", "--message", required=True)
    for name, what in (("backup", "into this empty directory"), ("restore", "from this backup")):
        sub.add_parser(name, help=f"{name} every database, file and adapter").add_argument(
            "dir", help=what
        )
    plan = sub.add_parser("plan", help="check that a model fits the GPUs before launching vLLM")
    plan.add_argument("--profile", help="a launch profile (deploy/inference/NAME.yaml)")
    plan.add_argument("--model", help="a model directory or its config.json")
    plan.add_argument("--gpus", help="comma-separated: 5090, pro6000, h100, h200")
    plan.add_argument("--tp", type=int, default=1)
    plan.add_argument("--pp", type=int, default=1)
    plan.add_argument("--dp", type=int, default=1)
    plan.add_argument("--ep", action="store_true", help="expert parallel")
    plan.add_argument("--memory-fraction", type=float, default=0.9)
    plan.add_argument("--max-model-len", type=int)
    plan.add_argument("--quantization", choices=["fp8", "awq", "gptq", "bitsandbytes"])
    plan.add_argument("--models-dir", default="var/models")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "db":
        return _db(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "projects":
        return _projects(args)
    if args.command == "usage":
        return _usage(args)
    if args.command == "trace":
        return _trace(args)
    if args.command in ("backup", "restore"):
        return _backup(args)
    return _keys(args)


if __name__ == "__main__":
    sys.exit(main())
