"""Tests of ``asr_assets.data``: FeatureDataset modes, DynamicBucketingSampler, collate_padded, DataLoader workers.

A real cache is built once for the module with the CLI on the bundled sample (``asr-assets
materialize --workers 1``: 20 train utterances of real speech); tests that change a cache work on
copies of it. torch is part of the test extra, so it is imported directly.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from asr_assets.cli import main as cli_main
from asr_assets.data import (
    DynamicBucketingSampler,
    FeatureComputeError,
    FeatureDataset,
    FeaturesNotCachedError,
    collate_padded,
)
from asr_assets.feature_cache import ShardedParquetFeatureCache, list_parts, shard_dir
from asr_assets.frontends import get_frontend
from asr_assets.record_cache import RecordStore

REPO = Path(__file__).resolve().parents[1]
FRONTEND_HASH = get_frontend("squeezeformer").frontend_hash()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Output root of ``asr-assets materialize`` on the bundled sample (record cache + squeezeformer features)."""
    root = tmp_path_factory.mktemp("data_cache")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("ASR_ASSETS_MANIFESTS", "ASR_ASSETS_OUTPUT", "ASR_ASSETS_FRONTENDS", "ASR_ASSETS_WORKERS"):
            mp.delenv(var, raising=False)
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        assert cli_main(["materialize", "--output", str(root / "out"), "--workers", "1"]) == 0
    return root / "out"


def _copy(built: Path, dst: Path, *, features: bool = True) -> Path:
    shutil.copytree(built / "record_cache", dst / "record_cache")
    if features:
        shutil.copytree(built / "feature-cache", dst / "feature-cache")
    return dst


def _parts(split_root: Path) -> list[Path]:
    return sorted(split_root.glob("feature_shards/features_*/part_*.parquet"))


def _rows_per_key(split_root: Path) -> Counter:
    counts: Counter = Counter()
    for part in _parts(split_root):
        counts.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    return counts


def _split_root(out: Path, split: str = "train") -> Path:
    return out / "feature-cache" / split


# --- packaging -----------------------------------------------------------------------------------


def test_core_library_imports_neither_data_nor_torch():
    code = ("import sys, asr_assets, asr_assets.cli, asr_assets.pipeline, asr_assets.extraction, "
            "asr_assets.feature_cache, asr_assets.record_cache, asr_assets.definitions\n"
            "bad = [m for m in ('asr_assets.data', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)


def test_import_without_torch_names_the_extra():
    code = ("import sys\nsys.modules['torch'] = None\n"
            "try:\n    import asr_assets.data\nexcept ImportError as exc:\n    print(exc)\n"
            "else:\n    raise SystemExit('imported without torch')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install -e ".[torch]"' in result.stdout


# --- FeatureDataset --------------------------------------------------------------------------------


def test_eager_returns_exactly_the_cached_arrays(built):
    dataset = FeatureDataset(built, "train")
    cache = ShardedParquetFeatureCache(_split_root(built))
    records = list(RecordStore(built / "record_cache" / "train.jsonl"))
    assert len(dataset) == len(records) == 20
    for index, record in enumerate(records):
        item = dataset[index]
        assert set(item) == {"utterance_id", "features", "num_frames", "transcript", "speaker_id"}
        assert item["utterance_id"] == record["utterance_id"]
        assert item["transcript"] == record["transcript"] and item["speaker_id"] == record["speaker_id"]
        assert item["features"].dtype == torch.float32 and item["features"].shape[1] == 80
        assert item["num_frames"] == item["features"].shape[0]
        assert torch.equal(item["features"], torch.from_numpy(cache.load(record["utterance_id"], "squeezeformer")))
    assert dataset[-1]["utterance_id"] == records[-1]["utterance_id"]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_lazy_equals_eager_bit_for_bit_and_writes_nothing(built):
    before = [(p, p.stat().st_mtime_ns) for p in _parts(_split_root(built))]
    eager = FeatureDataset(built, "train", mode="eager")
    lazy = FeatureDataset(built, "train", mode="lazy")
    for index in range(len(eager)):
        assert torch.equal(lazy[index]["features"], eager[index]["features"]), eager[index]["utterance_id"]
    assert [(p, p.stat().st_mtime_ns) for p in _parts(_split_root(built))] == before


def test_eager_miss_names_the_utterance_frontend_and_cache(built, tmp_path):
    out = _copy(built, tmp_path / "out", features=False)
    dataset = FeatureDataset(out, "train", mode="eager")
    uid = dataset.records[3]["utterance_id"]
    with pytest.raises(FeaturesNotCachedError) as info:
        dataset[3]
    message = str(info.value)
    assert uid in message and "squeezeformer" in message and FRONTEND_HASH in message
    assert str(_split_root(out).resolve()) in message
    assert info.value.utterance_id == uid and info.value.frontend == "squeezeformer"
    assert pickle.loads(pickle.dumps(info.value)).utterance_id == uid


def test_bad_arguments(built, tmp_path):
    with pytest.raises(ValueError, match="lazy_cached"):
        FeatureDataset(built, "train", mode="cached")
    with pytest.raises(FileNotFoundError, match="materialize"):
        FeatureDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="eager"):
        FeatureDataset(built, "train", mode="lazy", store={})
    with pytest.raises(TypeError):
        FeatureDataset(built, "train", store=object())


class _DictStore:
    """An exported store: ``load(utterance_id)`` -> array or None (like the numpy-memmap/HDF5 stores)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def load(self, utterance_id):
        return self.arrays.get(utterance_id)

    def __repr__(self) -> str:
        return "_DictStore(test)"


def test_store_is_read_instead_of_the_parquet_cache(built, tmp_path):
    out = _copy(built, tmp_path / "out", features=False)  # no Parquet cache at all
    records = list(RecordStore(out / "record_cache" / "train.jsonl"))
    arrays = {r["utterance_id"]: np.full((i + 1, 80), i, dtype=np.float32) for i, r in enumerate(records[:-1])}
    memmap_path = tmp_path / "first.f32"
    arrays[records[0]["utterance_id"]].tofile(memmap_path)  # a read-only memmap, as a memmap store returns
    arrays[records[0]["utterance_id"]] = np.memmap(memmap_path, dtype=np.float32, mode="r", shape=(1, 80))
    dataset = FeatureDataset(out, "train", store=_DictStore(arrays))
    for i in range(len(records) - 1):
        assert torch.equal(dataset[i]["features"], torch.full((i + 1, 80), float(i)))
    with pytest.raises(FeaturesNotCachedError, match="_DictStore") as info:
        dataset[len(records) - 1]
    assert records[-1]["utterance_id"] in str(info.value)


def _drop_parts(out: Path, uids: list[str]) -> set[str]:
    """Delete the parts holding ``uids`` in the train cache; returns every key they held."""
    cache = ShardedParquetFeatureCache(_split_root(out))
    removed: set[str] = set()
    for uid in uids:
        key = cache.key(uid, "squeezeformer")
        where = cache.shard_index_of(key)[key]
        if where[0].exists():
            removed.update(pq.read_table(where[0], columns=["key"]).column("key").to_pylist())
            where[0].unlink()
    return removed


def test_lazy_cached_computes_writes_back_and_the_next_dataset_reads(built, tmp_path, monkeypatch):
    out = _copy(built, tmp_path / "out")
    expected = {item["utterance_id"]: item["features"] for item in FeatureDataset(built, "train")}
    removed = _drop_parts(out, [FeatureDataset(out, "train").records[i]["utterance_id"] for i in (0, 5, 11)])
    reference = _parts(_split_root(out))[0]  # a part the extractor wrote
    untouched = set(_parts(_split_root(out)))

    computed: list[str] = []
    original = FeatureDataset.compute

    def counting(self, record):
        computed.append(record["utterance_id"])
        return original(self, record)

    monkeypatch.setattr(FeatureDataset, "compute", counting)
    dataset = FeatureDataset(out, "train", mode="lazy_cached")
    for index in range(len(dataset)):
        item = dataset[index]
        assert torch.equal(item["features"], expected[item["utterance_id"]])
    cache = ShardedParquetFeatureCache(_split_root(out))
    assert {cache.key(u, "squeezeformer") for u in computed} == removed and len(computed) == len(removed) >= 3

    new_parts = set(_parts(_split_root(out))) - untouched
    assert new_parts and all(p.exists() for p in untouched)  # appended, nothing rewritten
    extractor_meta = pq.read_schema(reference).metadata
    for part in new_parts:
        assert pq.read_schema(part).metadata == extractor_meta  # compaction / keys() see them as squeezeformer's
    for uid in computed:
        key = cache.key(uid, "squeezeformer")
        assert key in cache.keys(int(key[:8], 16) % 64, frontend_hash=FRONTEND_HASH)
    assert set(_rows_per_key(_split_root(out)).values()) == {1}

    # A second dataset object (eager, and lazy_cached) reads them with no compute at all.
    computed.clear()
    again = FeatureDataset(out, "train", mode="lazy_cached")
    eager = FeatureDataset(out, "train", mode="eager")
    for index in range(len(again)):
        assert torch.equal(again[index]["features"], expected[again[index]["utterance_id"]])
        assert torch.equal(eager[index]["features"], expected[eager[index]["utterance_id"]])
    assert computed == []


def test_lazy_cached_compute_failure_names_the_utterance(built, tmp_path):
    out = _copy(built, tmp_path / "out", features=False)
    dataset = FeatureDataset(out, "train", mode="lazy_cached")
    record = dict(dataset.records[2], audio_path=None, audio_blob_abspath=None)
    dataset.records = [dataset.records[0], record]  # a record whose audio is gone
    with pytest.raises(FeatureComputeError, match=record["utterance_id"]) as info:
        dataset.__getitems__([0, 1])
    assert info.value.stage == "decode"
    # the item that could be computed was written before the error was raised
    assert _rows_per_key(_split_root(out)) == Counter({dataset.cache.key(dataset.records[0]["utterance_id"]): 1})


class _SlowLazyCached(FeatureDataset):
    """lazy_cached whose computing is slow and logged, so that two workers both miss, both compute
    and then race to write the same keys (module level: picklable under any start method)."""

    log: str = ""

    def compute(self, record):
        features = super().compute(record)
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()} {record['utterance_id']}\n")
        time.sleep(0.3)
        return features


def test_two_dataloader_workers_on_the_same_misses_write_each_key_once(built, tmp_path):
    out = _copy(built, tmp_path / "out", features=False)
    dataset = _SlowLazyCached(out, "train", mode="lazy_cached")
    dataset.log = str(tmp_path / "computed.log")
    same = list(range(6))
    loader = DataLoader(dataset, batch_sampler=[same, same], collate_fn=collate_padded, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and torch.equal(batches[0]["features"], batches[1]["features"])
    lines = Path(dataset.log).read_text().split()
    pids = set(lines[0::2])
    assert len(pids) == 2 and Counter(lines[1::2]) == Counter({dataset.records[i]["utterance_id"]: 2 for i in same})
    cache = ShardedParquetFeatureCache(_split_root(out))
    keys = {cache.key(dataset.records[i]["utterance_id"]) for i in same}
    assert _rows_per_key(_split_root(out)) == Counter({key: 1 for key in keys})
    reference = FeatureDataset(built, "train")
    for i in same:
        assert torch.equal(FeatureDataset(out, "train")[i]["features"], reference[i]["features"])


def test_dataset_pickles_without_open_parts(built):
    dataset = FeatureDataset(built, "train")
    dataset[0]
    assert dataset.cache._index  # a shard is indexed in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert not (clone.cache._parts or clone.cache._index or clone.cache._part_indexes) and torch.equal(clone[0]["features"], dataset[0]["features"])


# --- DynamicBucketingSampler ---------------------------------------------------------------------


def _lengths(n: int = 500, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 1500, size=n)
    lengths[[3, 77, 150]] = [5000, 2600, 2001]  # longer than max_frames below
    return lengths


def _epoch(sampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("max_frames", [2000, 6000, 20000])
def test_sampler_every_index_once_and_frames_bounded(max_frames):
    lengths = _lengths()
    sampler = DynamicBucketingSampler(lengths, max_frames=max_frames, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = _epoch(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        for batch in batches:
            total = int(lengths[batch].sum())
            assert total <= max_frames or (len(batch) == 1 and lengths[batch[0]] > max_frames), (batch, total)
        oversize = {int(i) for i in np.flatnonzero(lengths > max_frames)}
        assert {b[0] for b in batches if len(b) == 1 and b[0] in oversize} == oversize


def test_sampler_buckets_by_length():
    lengths = _lengths()
    sampler = DynamicBucketingSampler(lengths, max_frames=6000, num_buckets=8)
    buckets = np.searchsorted(sampler.bins, lengths, side="right")
    assert 5 <= len(sampler.bins) + 1 <= 8
    for batch in sampler:
        assert len(set(buckets[batch].tolist())) == 1  # one bucket: similar lengths
    spread = [lengths[b].max() - lengths[b].min() for b in sampler if len(b) > 1]
    assert np.mean(spread) < 0.5 * (lengths.max() - lengths.min())


def test_sampler_deterministic_per_seed_and_epoch():
    lengths = _lengths()
    a = DynamicBucketingSampler(lengths, max_frames=6000, seed=7)
    b = DynamicBucketingSampler(lengths, max_frames=6000, seed=7)
    assert _epoch(a) == _epoch(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert _epoch(a) == _epoch(b)
    a.set_epoch(0)
    assert _epoch(a) != _epoch(b)
    assert _epoch(DynamicBucketingSampler(lengths, max_frames=6000, seed=8)) != _epoch(a)
    unshuffled = DynamicBucketingSampler(lengths, max_frames=6000, shuffle=False)
    first = _epoch(unshuffled)
    unshuffled.set_epoch(5)
    assert _epoch(unshuffled) == first


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ranks_disjoint_and_equal_length(world_size, drop_last):
    lengths = _lengths(n=203)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            sampler = DynamicBucketingSampler(lengths, max_frames=5000, seed=1, drop_last=drop_last,
                                              world_size=world_size, rank=rank)
            sampler.set_epoch(epoch)
            per_rank.append(_epoch(sampler))
            assert len(per_rank[-1]) == len(sampler)
        assert len({len(batches) for batches in per_rank}) == 1
        flat = [i for batches in per_rank for b in batches for i in b]
        assert len(flat) == len(set(flat))  # disjoint
        if drop_last:
            assert set(flat) < set(range(len(lengths)))
        else:
            assert sorted(flat) == list(range(len(lengths)))


def test_sampler_too_few_utterances_for_the_ranks_repeats_with_a_warning():
    with pytest.warns(UserWarning, match="world_size=4"):
        per_rank = [_epoch(DynamicBucketingSampler([100, 200, 300], max_frames=1000, world_size=4, rank=r))
                    for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert {i for batches in per_rank for b in batches for i in b} == {0, 1, 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(DynamicBucketingSampler([100, 200, 300, 400], max_frames=1000, world_size=4, rank=0)) == 1


def test_sampler_arguments():
    with pytest.raises(ValueError):
        DynamicBucketingSampler([1, 2], max_frames=0)
    with pytest.raises(ValueError):
        DynamicBucketingSampler([1, 2], max_frames=10, world_size=2, rank=2)
    with pytest.raises(TypeError):
        DynamicBucketingSampler(object(), max_frames=10)
    assert list(DynamicBucketingSampler([], max_frames=10)) == []
    capped = DynamicBucketingSampler([10] * 10, max_frames=1000, max_items=3)
    assert max(len(b) for b in capped) <= 3 and sum(len(b) for b in capped) == 10


def test_sampler_reads_the_sidecar_not_the_features(built, monkeypatch):
    dataset = FeatureDataset(built, "train")

    def refuse(*args, **kwargs):
        raise AssertionError("the sampler read features")

    monkeypatch.setattr(dataset.cache, "load_many", refuse)
    sampler = DynamicBucketingSampler(dataset, max_frames=1200, seed=0)
    np.testing.assert_array_equal(sampler.lengths, np.fromfile(
        built / "record_cache" / "train.jsonl.estimated_frames.u32", dtype="<u4"))
    assert sorted(i for b in sampler for i in b) == list(range(len(dataset)))


# --- collate_padded and DataLoader -----------------------------------------------------------------


def test_collate_padded_shapes_padding_lengths():
    items = [{"utterance_id": f"u{i}", "features": torch.full((n, 3), float(i + 1)), "transcript": f"t{i}",
              "speaker_id": None} for i, n in enumerate([4, 7, 2])]
    batch = collate_padded(items)
    assert batch["features"].shape == (3, 7, 3) and batch["features"].dtype == torch.float32
    assert batch["feature_lengths"].dtype == torch.int64 and batch["feature_lengths"].tolist() == [4, 7, 2]
    assert batch["utterance_ids"] == ["u0", "u1", "u2"] and batch["transcripts"] == ["t0", "t1", "t2"]
    for row, n in enumerate([4, 7, 2]):
        assert torch.all(batch["features"][row, :n] == row + 1) and torch.all(batch["features"][row, n:] == 0)
    with pytest.raises(ValueError):
        collate_padded([])
    with pytest.raises(ValueError, match="u1"):
        collate_padded([items[0], dict(items[1], features=torch.zeros(5, 4))])


def test_dataloader_two_workers_one_epoch_every_utterance_once(built):
    dataset = FeatureDataset(built, "train", mode="eager")
    sampler = DynamicBucketingSampler(dataset, max_frames=1500, seed=0)
    sampler.set_epoch(2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_padded, num_workers=2)
    assert len(loader) == len(sampler)
    reference = {item["utterance_id"]: item["features"] for item in dataset}
    seen = []
    for batch in loader:
        for row, uid in enumerate(batch["utterance_ids"]):
            n = int(batch["feature_lengths"][row])
            assert torch.equal(batch["features"][row, :n], reference[uid])
            assert torch.all(batch["features"][row, n:] == 0)
        seen.extend(batch["utterance_ids"])
    assert sorted(seen) == sorted(reference) and len(seen) == len(dataset)
