"""python -m services.gateway.store COMMAND: the conversation store's administration.

  new-key KEY_ID              a line for --store-key-file (a fresh AES-256 key)
  delete-tenant TENANT        erase everything one tenant stored
  purge                       delete what is past its retention now
  backup FILE                 an online copy of a SQLite store (PostgreSQL: pg_dump, see docs)
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys

from services.gateway.store.cli import add_store_args, open_store
from services.gateway.store.database import engine_url
from services.gateway.store.sealing import new_key_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway.store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_args(parser)
    parser.add_argument("command", choices=["new-key", "delete-tenant", "purge", "backup"])
    parser.add_argument("operand", nargs="?")
    args = parser.parse_args(argv)
    if args.command == "new-key":
        print(new_key_line(args.operand or "k1"))
        return 0
    if args.command == "backup":
        return _backup(args.conversation_store, args.operand)
    store = open_store(args)
    if store is None:
        parser.error("--conversation-store is none")
    if args.command == "delete-tenant" and not args.operand:
        parser.error("delete-tenant needs the tenant")

    async def run():
        try:
            if args.command == "delete-tenant":
                return await store.delete_tenant(args.operand)
            return await store.purge_expired()
        finally:
            await store.close()

    print(asyncio.run(run()))
    return 0


def _backup(location: str, target: str | None) -> int:
    url = engine_url(location)
    if not url.startswith("sqlite") or not target:
        print("backup FILE copies a SQLite store; for PostgreSQL run pg_dump (docs/conversations.md)", file=sys.stderr)
        return 2
    source = sqlite3.connect(url.split(":///", 1)[1])
    with sqlite3.connect(target) as copy:
        source.backup(copy)  # consistent while gateways keep writing
    source.close()
    print(f"backed up to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
