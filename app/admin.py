"""Operator commands, run on the server: ``python -m app.admin create-key --admin``.

Applies migrations first, so it works on a fresh install before the API ever started.
"""

from __future__ import annotations

import argparse
import json

from app.db.session import session_scope
from app.serve import migrate
from app.services.keys import create_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="create an API key and print its secret once")
    create.add_argument("--tenant", default="default", help="tenant name (created if new)")
    create.add_argument("--name", default="admin")
    create.add_argument("--admin", action="store_true", help="may manage keys at /v1/api-keys")
    create.add_argument("--json", action="store_true", help="print a JSON object instead of the bare key")
    args = parser.parse_args(argv)

    migrate()
    with session_scope() as session:
        key, secret = create_key(session, args.tenant, args.name, args.admin)
        out = {"id": key.id, "tenant_id": key.tenant_id, "key": secret, "admin": key.is_admin}
    print(json.dumps(out) if args.json else secret)


if __name__ == "__main__":
    main()
