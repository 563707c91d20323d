"""Operator commands, run on the server: tenants, their first key, and operator keys.

    python -m app.admin create-key --tenant acme --name ops --scope admin   # a tenant and its admin
    python -m app.admin create-key --tenant ops --name prometheus --scope operator
    python -m app.admin set-scope key_3f9a... member                        # demote a key

Being on the server is what makes these operator actions: no request to the API can create an
operator key. Applies migrations first, so it works on a fresh install before the API ever started.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy import select

from app.auth import SCOPES
from app.db.models import ApiKey
from app.db.session import session_scope
from app.serve import migrate
from app.services.keys import create_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="create an API key and print its secret once")
    create.add_argument("--tenant", default="default", help="tenant name (created if new)")
    create.add_argument("--name", default="admin")
    create.add_argument("--scope", choices=SCOPES, default="member",
                        help="admin: manages its tenant's keys; operator: every tenant's keys and /metrics")
    create.add_argument("--admin", action="store_const", dest="scope", const="admin", help="same as --scope admin")
    create.add_argument("--json", action="store_true", help="print a JSON object instead of the bare key")
    demote = commands.add_parser("set-scope", help="change a key's scope (e.g. take admin or operator away)")
    demote.add_argument("key_id")
    demote.add_argument("scope", choices=SCOPES)
    args = parser.parse_args(argv)

    migrate()
    if args.command == "set-scope":
        with session_scope() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.id == args.key_id))
            if key is None:
                sys.exit(f"no API key {args.key_id!r}")
            key.scope = args.scope
        print(f"{args.key_id}: {args.scope}")
        return
    with session_scope() as session:
        key, secret = create_key(session, args.tenant, args.name, args.scope)
        out = {"id": key.id, "tenant_id": key.tenant_id, "key": secret, "scope": key.scope, "admin": key.is_admin}
    print(json.dumps(out) if args.json else secret)


if __name__ == "__main__":
    main()
