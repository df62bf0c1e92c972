"""Feature cache: key and shard vectors (spec §3.2), SFCF32L1 payload vector (§3.4), Parquet schema,
atomic parts, and upstream read semantics (newest part wins, last row in a part wins, tombstones, §3.5)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import ShardedParquetFeatureCache
from asr_assets.errors import CacheCorruptError
from asr_assets import feature_cache
from asr_assets.feature_cache import (ShardWriter, cache_key, compact_shard, decode_payload, encode_payload, list_parts,
                                      tombstone_keys,
                                      shard_dir, shard_index)


@pytest.mark.parametrize("frontend_hash, key, shard", [
    ("0a48384efcf3", "cfc05ec3688713645ff1287417d256d1cea2aa006ecf949922031ea9a5d151c8", 3),
    ("4d9c4bc8f09a", "b24311cbe82f6db7ac1a0683909b3ed979bc087c52d8e64cac5d5f4c5482fedc", 11),
    ("c62e513533e1", "a87946cbc8bf5dc1d2fd81b94e5da55d81d00c69db30cef8a64de9996657eb66", 11),
])
def test_key_and_shard_vectors(frontend_hash, key, shard):
    assert cache_key("utt-1", frontend_hash) == key
    assert shard_index(key) == shard


def test_reader_key_uses_frontend_hash():
    cache = ShardedParquetFeatureCache("/nonexistent")
    assert cache.key("utt-1", "squeezeformer") == "cfc05ec3688713645ff1287417d256d1cea2aa006ecf949922031ea9a5d151c8"
    assert cache.load("utt-1") is None


def test_payload_vector():
    payload = encode_payload(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert payload.hex() == ("5346434633324c31" "02000000" "03000000" "00000000" "0000803f" "00000040"
                             "00004040" "00008040" "0000a040")
    assert len(payload) == 40
    np.testing.assert_array_equal(decode_payload(payload), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(CacheCorruptError):
        decode_payload(payload[:-1])
    with pytest.raises(CacheCorruptError, match="not SFCF32L1"):
        decode_payload(b"\x80\x02legacy-pickle")


def test_reads_a_hand_written_upstream_part(tmp_path):
    """Like upstream's part_rust_test.parquet: plain string/binary/bool columns written by another writer."""
    key = cache_key("utt-1", "0a48384efcf3")
    directory = shard_dir(tmp_path, shard_index(key))
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"key": [key], "payload": [encode_payload(np.arange(6, dtype=np.float32).reshape(2, 3))],
                             "deleted": [False]}), directory / "part_rust_test.parquet", compression="none")
    np.testing.assert_array_equal(ShardedParquetFeatureCache(tmp_path).load("utt-1"), np.arange(6).reshape(2, 3))


def test_written_schema_and_atomic_names(tmp_path):
    with ShardWriter(tmp_path, 5, rows_per_part=2, metadata={"frontend": "squeezeformer"}) as writer:
        for i in range(3):
            writer.add(f"k{i}", np.full((2, 4), i, dtype=np.float32))
    names = sorted(os.listdir(shard_dir(tmp_path, 5)))
    # the parts, the persisted shard index and its lock; no temporary file is left behind
    assert [n for n in names if n.startswith(".")] == [feature_cache.SHARD_INDEX_NAME, ".lock-index"]
    parts = [n for n in names if not n.startswith(".")]
    assert len(parts) == 2 and all(p.startswith("part_") and p.endswith(".parquet") for p in parts)
    table = pq.read_table(shard_dir(tmp_path, 5) / parts[0])
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("payload").type == pa.binary()
    assert table.schema.field("deleted").type == pa.bool_()
    assert table.schema.metadata[b"frontend"] == b"squeezeformer"


def test_read_semantics_newest_part_last_row_tombstone(tmp_path):
    cache = ShardedParquetFeatureCache(tmp_path, refresh_interval_s=0)  # re-validate on every load
    key = cache.key("u", "squeezeformer")
    shard = shard_index(key)
    with ShardWriter(tmp_path, shard) as writer:
        writer.add(key, np.zeros((1, 2), np.float32))
        writer.add(key, np.ones((1, 2), np.float32))  # last row of the part wins
    assert cache.load("u")[0, 0] == 1.0
    time.sleep(0.01)
    with ShardWriter(tmp_path, shard) as writer:
        writer.add(key, np.full((1, 2), 7, np.float32))
    assert cache.load("u")[0, 0] == 7.0  # newest part wins
    time.sleep(0.01)
    with ShardWriter(tmp_path, shard) as writer:
        writer.delete(key)
    assert cache.load("u") is None
    assert cache.keys(shard) == set()
    # a temporary (half-written) part is never read
    (shard_dir(tmp_path, shard) / ".part_1_2_000001.parquet.tmp.otherhost-123").write_bytes(b"garbage")
    assert cache.load("u") is None


def test_stale_temporary_files_of_dead_local_writers_are_removed(tmp_path):
    import subprocess

    from asr_assets._fs import remove_stale_tmp, tmp_suffix

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_suffix()
    host = mine.split(".tmp.", 1)[1].rsplit("-", 1)[0]
    (tmp_path / f".part_a.parquet{mine}").write_bytes(b"live writer")            # this process: kept
    (tmp_path / f".part_b.parquet.tmp.{host}-{dead.pid}").write_bytes(b"dead")    # dead local pid: removed
    (tmp_path / f".part_c.parquet.tmp.otherhost-{dead.pid}").write_bytes(b"?")    # another machine: kept
    (tmp_path / "part_d.parquet").write_bytes(b"committed")                       # not temporary: kept
    assert remove_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".part_a.parquet" + mine, f".part_c.parquet.tmp.otherhost-{dead.pid}", "part_d.parquet"]


def test_reader_lists_a_shard_once_per_interval_and_on_refresh(tmp_path, monkeypatch):
    """Warm loads neither list nor stat the shard; new parts appear after refresh()."""
    from asr_assets import feature_cache

    cache = ShardedParquetFeatureCache(tmp_path, refresh_interval_s=3600)
    keys = [cache.key(f"u{i}", "squeezeformer") for i in range(40)]
    for i, key in enumerate(keys):
        with ShardWriter(tmp_path, shard_index(key), rows_per_part=256) as writer:
            writer.add(key, np.full((3, 2), i, np.float32))
    listings = []
    real = feature_cache.list_parts
    monkeypatch.setattr(feature_cache, "list_parts", lambda d: listings.append(d) or real(d))
    for _ in range(3):
        for i in range(40):
            assert cache.load(f"u{i}")[0, 0] == i
    assert len(listings) == len({shard_index(k) for k in keys})  # once per shard, not per load
    # a newer part is invisible until refresh() (or the interval), then wins
    with ShardWriter(tmp_path, shard_index(keys[0])) as writer:
        writer.add(keys[0], np.full((3, 2), 99, np.float32))
    assert cache.load("u0")[0, 0] == 0
    cache.refresh()
    assert cache.load("u0")[0, 0] == 99
    # load_many groups by part and keeps the order of its arguments
    got = cache.load_many([f"u{i}" for i in (5, 1, 5, 39)] + ["missing"])
    assert [g[0, 0] for g in got[:4]] == [5, 1, 5, 39] and got[4] is None


def test_prefetch_builds_every_shard_once_on_threads_and_reads_the_same(tmp_path, monkeypatch):
    """``prefetch`` lists each shard once (with ``threads=8`` several at once, as on an object
    store), after which visits and loads list nothing within the interval; its indexes equal
    those a reader builds shard by shard; an error of one shard's build reaches the caller."""
    import threading

    keys = [cache_key(f"u{i}", "0a48384efcf3") for i in range(300)]
    for i, key in enumerate(keys):
        with ShardWriter(tmp_path, shard_index(key), rows_per_part=256) as writer:
            writer.add(key, np.full((3, 2), i, np.float32))
    listings, threads = [], set()
    real = feature_cache.list_parts

    def counting(directory):
        listings.append(directory)
        threads.add(threading.get_ident())
        return real(directory)

    monkeypatch.setattr(feature_cache, "list_parts", counting)
    cache, twin = ShardedParquetFeatureCache(tmp_path), ShardedParquetFeatureCache(tmp_path)
    cache.prefetch(range(64), threads=8)
    assert len(listings) == 64 and len(threads) > 1
    assert all(cache.shard_entries(s) == twin.shard_entries(s) for s in range(64))
    assert len(listings) == 128  # the twin's visits; the prefetched reader listed nothing more
    assert [int(f[0, 0]) for f in cache.load_keys(keys)] == list(range(300))
    cache.prefetch(range(64), threads=8)  # fresh within refresh_interval_s: nothing to do
    assert len(listings) == 128

    def broken(directory):
        if directory.name == "features_07":
            raise PermissionError(f"{directory}: permission denied")
        return real(directory)

    monkeypatch.setattr(feature_cache, "list_parts", broken)
    with pytest.raises(PermissionError, match="features_07"):
        ShardedParquetFeatureCache(tmp_path).prefetch(range(64), threads=8)


def _shard_ids(shard: int, n: int, fh: str = "0a48384efcf3") -> list[str]:
    return [u for u in (f"u{i}" for i in range(20 * 64 * n)) if shard_index(cache_key(u, fh)) == shard][:n]


def test_raw_reads_equal_pyarrow_and_fall_back_where_the_layout_differs(tmp_path):
    """Payloads are read as raw byte ranges of their column chunk; every value equals what
    pyarrow reads, and parts in other layouts (zstd as upstream's Python writer, a legacy torch
    payload, big row groups) are read through pyarrow."""
    rng = np.random.default_rng(3)
    ids = _shard_ids(7, 24)
    keys = [cache_key(u, "0a48384efcf3") for u in ids]
    arrays = [rng.standard_normal((int(rng.integers(1, 400)), 80)).astype(np.float32) for _ in ids]
    with ShardWriter(tmp_path, 7, rows_per_part=8) as writer:
        for key, array in zip(keys[:16], arrays[:16]):
            writer.add(key, array)
    directory = shard_dir(tmp_path, 7)
    payloads = [encode_payload(a) for a in arrays[16:20]]
    pq.write_table(pa.table({"key": keys[16:20], "payload": payloads, "deleted": [False] * 4}),
                   directory / "part_zz_polars_like.parquet", compression="zstd", row_group_size=1)
    legacy = b"PK\x03\x04 not SFCF32L1"  # a torch.save zip: the raw path must not take it
    pq.write_table(pa.table({"key": keys[20:24], "payload": [encode_payload(a) for a in arrays[20:23]] + [legacy],
                             "deleted": [False] * 4}), directory / "part_zz_uncompressed.parquet",
                   compression="none", row_group_size=1, use_dictionary=False)
    cache = ShardedParquetFeatureCache(tmp_path)
    _, _, _, spans = cache._shard(7)
    assert set(spans) == set(keys[:16]) | set(keys[20:24])  # zstd part: no raw spans
    for u, array in zip(ids[:23], arrays[:23]):
        got = cache.load(u)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, array)
    with pytest.raises(CacheCorruptError):  # the legacy payload went through pyarrow + torch's refusal
        cache.load(ids[23])
    for part in list_parts(directory):  # every span is exactly what pyarrow reads
        table = pq.read_table(part)
        for key, payload in zip(table.column("key").to_pylist(), table.column("payload").to_pylist()):
            if key in spans and payload[:8] == b"SFCF32L1":
                offset, length = spans[key]
                with open(part, "rb") as handle:
                    handle.seek(offset)
                    chunk = bytearray(handle.read(length))
                assert bytes(feature_cache._raw_payload(chunk)) == payload


def test_raw_payload_accepts_only_a_consistent_value():
    value = encode_payload(np.arange(6, dtype=np.float32).reshape(2, 3))
    page = bytearray(b"\x15\x00header" + len(value).to_bytes(4, "little") + value)
    assert bytes(feature_cache._raw_payload(page)) == value
    wrong_prefix = bytearray(b"\x15\x00header" + (len(value) + 1).to_bytes(4, "little") + value)
    assert feature_cache._raw_payload(wrong_prefix) is None
    truncated = bytearray(b"\x15\x00header" + len(value).to_bytes(4, "little") + value[:-4])
    assert feature_cache._raw_payload(truncated) is None
    # the magic inside the header (page statistics holding the value) is skipped
    stats = bytearray(b"\x18" + bytes([len(value)]) + value + len(value).to_bytes(4, "little") + value)
    assert bytes(feature_cache._raw_payload(stats)) == value


def test_persisted_shard_index_spares_the_footers_and_is_trusted_only_while_current(tmp_path, monkeypatch):
    ids = _shard_ids(2, 12)
    keys = [cache_key(u, "0a48384efcf3") for u in ids]
    for start in (0, 4):  # two runs, two parts; each writer close() updates the index
        with ShardWriter(tmp_path, 2, rows_per_part=256, metadata={"frontend_hash": "0a48384efcf3"}) as writer:
            for i in range(start, start + 4):
                writer.add(keys[i], np.full((2, 3), i, np.float32))
    directory = shard_dir(tmp_path, 2)
    index = pq.read_table(directory / feature_cache.SHARD_INDEX_NAME)
    assert sorted(index.column("key").to_pylist()) == sorted(keys[:8]) and min(index.column("offset").to_pylist()) > 0
    footers = []
    real = feature_cache.index_part
    monkeypatch.setattr(feature_cache, "index_part", lambda p: footers.append(Path(p).name) or real(p))
    cache = ShardedParquetFeatureCache(tmp_path)
    assert [cache.load(u)[0, 0] for u in ids[:8]] == list(range(8)) and footers == []
    assert cache.keys(2, frontend_hash="0a48384efcf3") == set(keys[:8])
    # a part the index does not know (a lazy_cached write-back): only its footer is read
    with ShardWriter(tmp_path, 2, update_index=False) as writer:
        writer.add(keys[8], np.full((2, 3), 8, np.float32))
        writer.add(keys[0], np.full((2, 3), 100, np.float32))  # newer part wins
    cache.refresh()
    assert cache.load(ids[8])[0, 0] == 8 and cache.load(ids[0])[0, 0] == 100 and len(footers) == 1
    footers.clear()
    fresh = ShardedParquetFeatureCache(tmp_path)
    assert fresh.load(ids[0])[0, 0] == 100 and footers == [writer.parts_written[0].name]
    # an entry of a part rewritten since (same name, other size/mtime) is not trusted
    part = writer.parts_written[0]
    pq.write_table(pa.table({"key": [keys[8]], "payload": [encode_payload(np.full((1, 3), 7, np.float32))],
                             "deleted": [False]}), part, compression="none", row_group_size=1, use_dictionary=False)
    os.utime(part, ns=(time.time_ns(), time.time_ns()))
    fresh = ShardedParquetFeatureCache(tmp_path)
    assert fresh.load(ids[8])[0, 0] == 7 and fresh.load(ids[0])[0, 0] == 0
    # an unreadable index is ignored: footers are read instead
    (directory / feature_cache.SHARD_INDEX_NAME).write_bytes(b"not parquet")
    footers.clear()
    assert ShardedParquetFeatureCache(tmp_path).load(ids[5])[0, 0] == 5 and len(footers) == 3
    # compaction rewrites the index to the one part left
    compact_shard(tmp_path, 2, "0a48384efcf3")
    index = pq.read_table(directory / feature_cache.SHARD_INDEX_NAME)
    assert len(set(index.column("part").to_pylist())) == len(list_parts(directory))


def test_parts_have_one_row_per_row_group_and_index_from_footer(tmp_path):
    ids = [u for u in (f"u{i}" for i in range(2000)) if shard_index(cache_key(u, "0a48384efcf3")) == 3][:7]
    k = [cache_key(u, "0a48384efcf3") for u in ids]
    with ShardWriter(tmp_path, 3, rows_per_part=5) as writer:
        for i in range(5):
            writer.add(k[i], np.full((2, 4), i, dtype=np.float32))
        writer.delete(k[2])
    parts = sorted(shard_dir(tmp_path, 3).glob("part_*.parquet"))
    meta = pq.ParquetFile(parts[0]).metadata
    assert meta.num_row_groups == 5 and all(meta.row_group(i).num_rows == 1 for i in range(5))
    assert meta.row_group(0).column(1).compression == "UNCOMPRESSED"  # payload
    assert meta.row_group(0).column(0).statistics.min == k[0]
    cache = ShardedParquetFeatureCache(tmp_path)
    assert cache.shard_entries(3) == {**{k[i]: (parts[0], i) for i in range(5) if i != 2}, k[2]: None}
    # a part written by upstream (one big row group) reads the same
    pq.write_table(pa.table({"key": [k[5], k[6]], "payload": [encode_payload(np.ones((1, 2), np.float32)), None],
                             "deleted": [False, True]}), shard_dir(tmp_path, 3) / "part_zz_upstream.parquet")
    fresh = ShardedParquetFeatureCache(tmp_path)
    assert fresh.load(ids[5])[0, 0] == 1.0 and fresh.load(ids[6]) is None and fresh.load(ids[2]) is None
    np.testing.assert_array_equal(fresh.read(ids[4]), np.full((2, 4), 4, np.float32))


def test_compaction_caps_rows_per_part_and_keeps_the_newest_rows(tmp_path):
    ids = _shard_ids(9, 10)
    keys = [cache_key(u, "0a48384efcf3") for u in ids]
    meta = {"frontend_hash": "0a48384efcf3"}
    for value in (1, 2):  # two runs over the same keys: the second wins
        with ShardWriter(tmp_path, 9, rows_per_part=4, metadata=meta) as writer:
            for i, key in enumerate(keys):
                writer.add(key, np.full((2, 3), 10 * value + i, np.float32))
    tombstone_keys(tmp_path, 9, "0a48384efcf3", keys[:2])
    result = compact_shard(tmp_path, 9, "0a48384efcf3", rows_per_part=3)
    assert result == {"parts_before": 7, "parts_after": 3, "rows_before": 22, "rows_after": 8, "tombstones_dropped": 2}
    parts = list_parts(shard_dir(tmp_path, 9))
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [3, 3, 2]
    cache = ShardedParquetFeatureCache(tmp_path)
    assert [cache.load(u) for u in ids[:2]] == [None, None]
    assert [cache.load(u)[0, 0] for u in ids[2:]] == [20 + i for i in range(2, 10)]
    assert compact_shard(tmp_path, 9, "0a48384efcf3", rows_per_part=3)["parts_after"] == 3  # idempotent
    assert list_parts(shard_dir(tmp_path, 9)) == parts
