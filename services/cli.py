"""`crucible`: the operator's command line.

    crucible keys create --owner alice [--name laptop] [--models m1,m2] [--rpm 600]
                         [--max-concurrency 32] [--admin]
    crucible keys list [--owner alice]
    crucible keys revoke KEY_ID

Keys are written to the gateway's database (CRUCIBLE_GATEWAY_DATABASE_URL, or SQLite under
CRUCIBLE_VAR_DIR); a running gateway sees a revocation within its key cache TTL (5 s).
"""

from __future__ import annotations

import argparse
import json
import sys

from services.gateway.config import GatewaySettings
from services.gateway.keys import KeyStore


def _keys(args: argparse.Namespace) -> int:
    store = KeyStore(GatewaySettings().db_url())
    try:
        if args.action == "create":
            models = [m for m in args.models.split(",") if m] if args.models else None
            secret, info = store.create(
                args.owner,
                name=args.name,
                models=models,
                rpm=args.rpm,
                max_concurrency=args.max_concurrency,
                admin=args.admin,
            )
            print(json.dumps({**info, "key": secret}, indent=2))
            print("Store the key now: only its hash is kept.", file=sys.stderr)
        elif args.action == "list":
            for k in store.list(args.owner):
                state = "revoked" if k["revoked_at"] else "active"
                print(
                    f"{k['id']}  {k['hint']}  owner={k['owner']}  {state}"
                    f"{'  admin' if k['admin'] else ''}  {k['name']}"
                )
        elif not store.revoke(args.key_id):
            print(f"no active key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}")
    finally:
        store.engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crucible", description="Operate a Crucible platform.")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create")
    create.add_argument("--owner", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--models", help="comma-separated allow-list (default: every model)")
    create.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    create.add_argument("--max-concurrency", type=int)
    create.add_argument("--admin", action="store_true")
    lst = ksub.add_parser("list")
    lst.add_argument("--owner")
    revoke = ksub.add_parser("revoke")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    return _keys(args)


if __name__ == "__main__":
    sys.exit(main())
