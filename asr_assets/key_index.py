"""The compact per-split key index: every record's feature-cache key and shard, for one frontend.

Planning a feature run needs, per shard, the records whose key falls in it. Parsing every JSONL
line of the record cache for that costs ~3 µs a record per frontend and per planning pass (a
10M-record split: ~30 s before any work). The index is computed once per record cache and
frontend hash and kept beside the record cache:

    <output>/record_cache/<split>.jsonl.keys-<hash12>.npz
        digests  u1 [records, 32]  sha256(f"{utterance_id}:{hash12}"), raw bytes (spec §3.2)
        shards   u2  [records]   int(key[:8], 16) % num_shards
        source   i8  [3]         the JSONL's size, mtime_ns and record count it was computed from

It is used only while ``source`` matches the JSONL on disk (a rebuilt record cache has a new
mtime), so a stale index is never trusted; it is rewritten atomically. Utterance ids are read with
``pyarrow.json`` (only the ``utterance_id`` field is materialized). Upstream never reads these
files.

Entry points: :func:`record_keys` (the arrays), :func:`records_in_shards` (record indexes of some
shards, in record order).
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from ._fs import atomic_write_bytes
from .record_cache import RecordStore

logger = logging.getLogger(__name__)


class RecordKeys(NamedTuple):
    """Keys of a record store for one frontend: ``digests`` (uint8 ``[records, 32]``, raw
    sha256) and ``shards`` (uint16 ``[records]``), both in record order."""

    digests: np.ndarray
    shards: np.ndarray

    def hex(self, index: int) -> str:
        """The 64-hex cache key of record ``index``."""
        return self.digests[index].tobytes().hex()


def index_path(store: RecordStore, frontend_hash: str) -> Path:
    """``<split>.jsonl.keys-<hash12>.npz`` beside the record store."""
    return store.path.with_name(f"{store.path.name}.keys-{frontend_hash}.npz")


def _source(store: RecordStore) -> np.ndarray:
    st = store.path.stat()
    return np.array([st.st_size, st.st_mtime_ns, len(store)], dtype=np.int64)


def utterance_ids(store: RecordStore) -> list[str]:
    """Every record's ``utterance_id``, in record order, read with ``pyarrow.json``."""
    if len(store) == 0:
        return []
    import pyarrow as pa
    import pyarrow.json as pj

    table = pj.read_json(store.path, read_options=pj.ReadOptions(block_size=16 << 20),
                         parse_options=pj.ParseOptions(explicit_schema=pa.schema([("utterance_id", pa.string())]),
                                                       unexpected_field_behavior="ignore"))
    ids = table.column("utterance_id").to_pylist()
    if len(ids) != len(store) or any(u is None for u in ids):  # never guess: the JSONL parser decides
        return [store[i]["utterance_id"] for i in range(len(store))]
    return ids


def record_keys(store: RecordStore, frontend_hash: str, num_shards: int, *, persist: bool = True) -> RecordKeys:
    """Cache keys and shards of every record of ``store`` for ``frontend_hash``.

    Read from the persisted index when it matches the record store, else computed (one pass over
    the JSONL with pyarrow, one sha256 per record) and, with ``persist``, saved atomically (best
    effort: a read-only record cache just recomputes next time).
    """
    path = index_path(store, frontend_hash)
    source = _source(store)
    try:
        with np.load(path, allow_pickle=False) as saved:
            if np.array_equal(saved["source"], source) and int(saved["num_shards"]) == num_shards:
                return RecordKeys(saved["digests"], saved["shards"])
    except (OSError, KeyError, ValueError):
        pass
    raw = b"".join(hashlib.sha256(f"{u}:{frontend_hash}".encode("utf-8")).digest() for u in utterance_ids(store))
    digests = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 32)
    # int(key[:8], 16) is the big-endian u32 of the digest's first 4 bytes
    first = np.ascontiguousarray(digests[:, :4]).view(">u4").reshape(-1)
    shards = (first.astype(np.uint64) % num_shards).astype(np.uint16)
    if persist:
        buffer = io.BytesIO()
        np.savez(buffer, digests=digests, shards=shards, source=source, num_shards=np.int64(num_shards))
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:
            logger.debug("key index %s not saved: %s", path, exc)
    return RecordKeys(digests, shards)


def records_in_shards(store: RecordStore, frontend_hash: str, shards: Iterable[int], num_shards: int) -> np.ndarray:
    """Indexes (int64, ascending) of the records whose key falls in ``shards``."""
    keys = record_keys(store, frontend_hash, num_shards)
    return np.flatnonzero(np.isin(keys.shards, np.fromiter(set(shards), dtype=np.int64)))

