"""`mta queue export FILE` and `mta queue import FILE`: move a queue with its lab
mailboxes between backends (SQLite <-> PostgreSQL) through a dump file
(mta/store/transfer.py). To move: `export` with the old config, `import` with the new.

Export refuses while the queue is in use (a daemon on the SQLite file, a node on the
database): mail arriving or being delivered meanwhile would be missed or delivered
twice. Import runs beside the daemon or the nodes, and may be run again after an
interruption: what is there already is skipped. Every problem is one line and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import Iterator
from typing import IO

from mta.cli.common import NoQueue
from mta.config import Config
from mta.store.factory import make_transfer
from mta.store.transfer import (
    Counts,
    DumpWriter,
    Record,
    TransferError,
    TransferStore,
    export_store,
    import_dump,
    read_dump,
)


def export(config: Config, path: str) -> int:
    if config.queue.backend == "sqlite" and not os.path.exists(config.queue.path):
        raise NoQueue(f"mta: queue export: {config.queue.path}: no queue database")
    target = make_transfer(config)
    try:
        counts = asyncio.run(_export(target, path))
    except TransferError as exc:
        print(f"mta: queue export: {exc}", file=sys.stderr)
        return 1
    # With the dump on standard output, the summary goes to standard error.
    print(f"exported {counts.summary()}", file=sys.stderr if path == "-" else sys.stdout)
    return 0


async def _export(source: TransferStore, path: str) -> Counts:
    await source.open()
    try:
        await source.check_quiet()
        writer = DumpWriter(path, source.name, await source.max_copy_id())
        try:
            return await export_store(source, writer)
        except BaseException:
            writer.abort()
            raise
    finally:
        await source.close()


def import_(config: Config, path: str) -> int:
    name = "standard input" if path == "-" else path
    try:
        stream: IO[bytes] = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        print(f"mta: queue import: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    counts = Counts()
    try:
        with contextlib.closing(stream):
            records = read_dump(stream)
            # The header is checked before the target is opened: a wrong file creates no queue.
            first = list(itertools.islice(records, 1))
            target = make_transfer(config)
            asyncio.run(_import(itertools.chain(first, records), target, counts))
    except TransferError as exc:
        done = f"; imported {counts.summary()} before it" if counts.messages or counts.copies else \
            "; nothing imported from it"
        print(f"mta: queue import: {name}: {exc}{done}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mta: queue import: {name}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        for old, new in counts.renamed:
            print(f"{old}: its queue id is another message's here: imported as {new}")
    print(f"imported {counts.summary()}")
    return 0


async def _import(records: Iterator[tuple[int, Record]], target: TransferStore, counts: Counts) -> None:
    await target.open()
    try:
        await import_dump(records, target, counts)
    finally:
        await target.close()

