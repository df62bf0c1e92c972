"""The per-split key index that planning reads instead of every record (asr_assets.key_index)."""

from __future__ import annotations

import numpy as np

from asr_assets import key_index
from asr_assets.extraction import plan_shard_tasks
from asr_assets.feature_cache import cache_key, shard_index
from asr_assets.record_cache import RecordStore, write_record_cache
from asr_assets.records import Record

HASH = "0a48384efcf3"  # squeezeformer (spec §3.2)


def _store(path, ids) -> RecordStore:
    write_record_cache(path, [Record(u, "train", f"text {u}", None, None, None, 1.0, "test") for u in ids])
    return RecordStore(path)


def test_keys_and_shards_equal_the_spec_formula_and_are_reused_while_current(tmp_path, monkeypatch):
    ids = ["utt-1", "ünïcødé/äöü", 'quote"and\\backslash', *(f"u{i}" for i in range(500))]
    store = _store(tmp_path / "train.jsonl", ids)
    keys = key_index.record_keys(store, HASH, 64)
    assert [keys.hex(i) for i in range(len(ids))] == [cache_key(u, HASH) for u in ids]
    assert keys.hex(0) == "cfc05ec3688713645ff1287417d256d1cea2aa006ecf949922031ea9a5d151c8"  # pinned, spec §3.2
    assert keys.shards.tolist() == [shard_index(cache_key(u, HASH)) for u in ids] and keys.shards[0] == 3
    assert key_index.index_path(store, HASH).is_file()
    # the saved index is read, not recomputed, while the record store is unchanged ...
    monkeypatch.setattr(key_index, "utterance_ids", lambda s: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = key_index.record_keys(RecordStore(tmp_path / "train.jsonl"), HASH, 64)
    assert np.array_equal(again.digests, keys.digests)
    monkeypatch.undo()
    # ... and never trusted once the record store was rewritten (other ids, same count)
    store = _store(tmp_path / "train.jsonl", [f"v{i}" for i in range(len(ids))])
    fresh = key_index.record_keys(store, HASH, 64)
    assert fresh.hex(5) == cache_key("v5", HASH)
    assert key_index.record_keys(store, HASH, 8).shards.tolist() == [shard_index(cache_key(f"v{i}", HASH), 8)
                                                                     for i in range(len(ids))]


def test_planning_one_shard_reads_only_its_records(tmp_path, monkeypatch):
    ids = [f"u{i}" for i in range(2000)]
    store = _store(tmp_path / "train.jsonl", ids)
    key_index.record_keys(store, HASH, 64)
    parsed = []
    real = RecordStore._item
    monkeypatch.setattr(RecordStore, "_item", lambda self, i, line: parsed.append(i) or real(self, i, line))
    plan = plan_shard_tasks(store, HASH, [7], 64)
    expected = [u for u in ids if shard_index(cache_key(u, HASH)) == 7]
    assert [t.utterance_id for t in plan[7]] == expected and [t.key for t in plan[7]] == [cache_key(u, HASH) for u in expected]
    assert len(parsed) == len(expected) < len(ids) / 20


def test_an_empty_store_and_an_unwritable_record_cache(tmp_path, monkeypatch):
    store = _store(tmp_path / "train.jsonl", [])
    keys = key_index.record_keys(store, HASH, 64)
    assert keys.digests.shape == (0, 32) and keys.shards.shape == (0,)
    store = _store(tmp_path / "ro" / "train.jsonl", ["a", "b"])

    def refuse(path, data):
        raise PermissionError(13, "read-only file system", str(path))

    monkeypatch.setattr(key_index, "atomic_write_bytes", refuse)
    assert key_index.record_keys(store, HASH, 64).hex(1) == cache_key("b", HASH)  # computed, not saved
    assert not key_index.index_path(store, HASH).exists()
