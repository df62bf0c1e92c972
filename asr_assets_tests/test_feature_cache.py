"""Feature cache: key and shard vectors (spec §3.2), SFCF32L1 payload vector (§3.4), Parquet schema,
atomic parts, and upstream read semantics (newest part wins, last row in a part wins, tombstones, §3.5)."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import ShardedParquetFeatureCache
from asr_assets.errors import CacheCorruptError
from asr_assets.feature_cache import ShardWriter, cache_key, decode_payload, encode_payload, shard_dir, shard_index


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
    parts = sorted(os.listdir(shard_dir(tmp_path, 5)))
    assert len(parts) == 2 and all(p.startswith("part_") and p.endswith(".parquet") for p in parts)
    table = pq.read_table(shard_dir(tmp_path, 5) / parts[0])
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("payload").type == pa.binary()
    assert table.schema.field("deleted").type == pa.bool_()
    assert table.schema.metadata[b"frontend"] == b"squeezeformer"


def test_read_semantics_newest_part_last_row_tombstone(tmp_path):
    cache = ShardedParquetFeatureCache(tmp_path)
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
