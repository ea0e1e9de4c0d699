"""The store's command-line options (the gateway's and the admin command's) and its background purge."""

from __future__ import annotations

import argparse
import asyncio
import logging

from services.common.cli import env_default
from services.gateway.store.database import Database, StoreUnavailable
from services.gateway.store.sealing import Sealer
from services.gateway.store.store import ConversationStore

log = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:///.mesh/data/conversations.sqlite3"
DAY_S = 86400.0


def add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversation-store", default=env_default("LLMMESH_CONVERSATION_STORE", DEFAULT_STORE),
                        help="where stored responses and conversations live: sqlite:///FILE (one gateway; WAL), "
                             "postgresql://USER:PASSWORD@HOST:PORT/DB (every gateway replica shares it), or none")
    parser.add_argument("--store-key-file", default=env_default("LLMMESH_STORE_KEY_FILE", ""),
                        help="AES-256-GCM keys for stored content, 'KEY_ID BASE64' lines, the first sealing new "
                             "rows (`python -m services.gateway.store new-key`); empty: stored unencrypted")
    parser.add_argument("--store-retention-days", type=float,
                        default=float(env_default("LLMMESH_STORE_RETENTION_DAYS", "30")),
                        help="stored items are purged this long after they were made (0: kept until deleted)")
    parser.add_argument("--store-timeout", type=float, default=5.0,
                        help="seconds the store may take to connect or answer before requests that need it "
                             "fail with UNAVAILABLE")


def open_store(args: argparse.Namespace) -> ConversationStore | None:
    if args.conversation_store in ("", "none"):
        return None
    sealer = Sealer.from_file(args.store_key_file or None)
    if not sealer.encrypts:
        log.warning("stored conversations are not encrypted at rest (no --store-key-file)")
    return ConversationStore(Database(args.conversation_store, args.store_timeout), sealer,
                             args.store_retention_days * DAY_S or None, getattr(args, "redact_personal_data", False))


async def purge_expired_forever(store: ConversationStore, interval_s: float | None = None) -> None:
    """Purge what outlived the retention, now and then (a tenth of it, at most every ten minutes)."""
    interval_s = interval_s or min(store.retention_s / 10, 600.0)
    while True:
        try:
            counts = await store.purge_expired()
            if any(counts.values()):
                log.info("purged expired stored items: %s", counts)
        except StoreUnavailable as exc:
            log.warning("retention purge skipped: %s", exc)
        await asyncio.sleep(interval_s)
