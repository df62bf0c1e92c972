"""Read speed of the feature cache against h5py, a bare np.memmap and lhotse, on the same arrays.

Usage::

    PYTHONPATH=. python benchmarks/readers.py [--utterances 4000] [--loads 2000] [--shards 4]
        [--parts-per-shard 300] [--epochs 2] [--max-frames 20000]

One run writes the same float32 ``[frames, 80]`` arrays (frames drawn like 2-15 s utterances)
several ways and reads them back in the same shuffled order:

* the sharded Parquet cache in two layouts over the same ``--shards`` of the 64 shards:
  *one run* (parts of 256 rows, as one extraction run writes them) and *grown*
  (``--parts-per-shard`` parts per shard, as a cache fed by that many incremental runs or
  ``lazy_cached`` write-backs has before ``asr-assets compact``; 300 is the issue's estimate for
  5M utterances). The utterance ids are drawn so they fall in those shards, so the part count per
  shard is realistic without writing terabytes;
* an HDF5 file with one dataset per utterance (SpeechBrain / lhotse style, read with h5py);
* one flat float32 file read through ``np.memmap`` with an offsets index;
* the ``numpy_memmap`` and ``hdf5`` stores exported from the Parquet cache
  (``asr_assets.stores.export_feature_store``), read through ``open_feature_store``.

Random loads:

* *warm*: the reader has already indexed its shards;
* *cold*: a fresh reader object. The OS page cache is warm, so this measures our own start-up,
  indexing and opening, not the disk. *cold, footers* deletes the persisted shard indexes first
  (``feature_cache.SHARD_INDEX_NAME``), so every part's footer is parsed.

Then a 2-worker ``torch.utils.data.DataLoader`` over ``FeatureDataset`` +
``DynamicBucketingSampler`` + ``collate_padded`` against lhotse's ``DynamicBucketingSampler`` +
``collate_features`` over a CutSet of the same arrays stored with ``LilcomChunkyWriter``
(icefall's default) and ``NumpyHdf5Writer``, when torch and lhotse are installed. Both batch by
``--max-frames`` frames (lhotse: ``max_duration = max_frames * 0.01 s``); one epoch is timed after
a warm-up epoch, best of ``--epochs``.

It prints loads/s, MB/s and the ratio to h5py for shuffled (random) and record-order
(sequential) loads, batches/s and frames/s, file sizes and write times. The figures move by ~15 % between runs on a shared 2-core VM; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr_assets import feature_cache  # noqa: E402
from asr_assets.feature_cache import ShardedParquetFeatureCache, ShardWriter, cache_key, list_parts, shard_dir, shard_index  # noqa: E402
from asr_assets.stores import export_feature_store, open_feature_store  # noqa: E402

HASH = "0a48384efcf3"  # squeezeformer
FEATURE_DIM = 80


def make_arrays(n: int, shards: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` utterance ids whose keys fall in shards ``0..shards-1``, with random float32 arrays."""
    rng = np.random.default_rng(seed)
    ids, i = [], 0
    while len(ids) < n:
        u = f"utt-{i:08d}"
        i += 1
        if shard_index(cache_key(u, HASH)) < shards:
            ids.append(u)
    return {u: rng.standard_normal((int(rng.integers(200, 1500)), FEATURE_DIM)).astype(np.float32) for u in ids}


def write_parquet(split_root: Path, arrays: dict[str, np.ndarray], parts_per_shard: int | None) -> float:
    """Write the cache (256 rows/part, or ``parts_per_shard`` parts per shard); returns seconds."""
    t = time.perf_counter()
    by_shard: dict[int, list[str]] = {}
    for u in arrays:
        by_shard.setdefault(shard_index(cache_key(u, HASH)), []).append(u)
    for shard, utts in by_shard.items():
        rows = 256 if parts_per_shard is None else max(1, math.ceil(len(utts) / parts_per_shard))
        with ShardWriter(split_root, shard, rows_per_part=rows, metadata={"frontend_hash": HASH}) as writer:
            for u in utts:
                writer.add(cache_key(u, HASH), arrays[u])
    return time.perf_counter() - t


def write_record_cache(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """A record cache whose ``estimated_frames`` are the arrays' frame counts (for FeatureDataset)."""
    from asr_assets.record_cache import write_record_cache as write
    from asr_assets.records import Record

    write(output / "record_cache" / "train.jsonl",
          (Record(u, "train", "x", None, None, None, (a.shape[0] - 1) / 100, "bench") for u, a in arrays.items()))


def time_best(runs: dict, rounds: int = 3) -> dict[str, float]:
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):  # interleaved rounds, best of 3
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def timed_loads(root: Path, arrays: dict[str, np.ndarray], order: list[str], layouts: dict[str, Path]) -> dict[str, float]:
    """Best seconds per reader for loading ``order`` (random), then as many utterances in record
    order (``<reader>, sequential``), then cold without persisted shard indexes (``, footers``)."""
    import h5py

    t = time.perf_counter()
    with h5py.File(root / "feats.h5", "w") as h5:
        for u, a in arrays.items():
            h5.create_dataset(u, data=a)
    print(f"write: h5py {time.perf_counter() - t:.2f} s ({(root / 'feats.h5').stat().st_size / 1e6:.0f} MB)")
    offsets, pos = {}, 0
    with open(root / "flat.f32", "wb") as fh:
        for u, a in arrays.items():
            offsets[u] = (pos, a.shape[0])
            fh.write(a.tobytes())
            pos += a.size
    exports = {backend: export_feature_store(layouts["one run"], root / backend, backend=backend, frontend=HASH,
                                             utterance_ids=list(arrays))
               for backend in ("numpy_memmap", "hdf5")}
    print("export (asr_assets.stores.export_feature_store from the Parquet cache): " + ", ".join(
        f"{b} {e.seconds:.2f} s ({sum(p.stat().st_size for p in e.path.iterdir()) / 1e6:.0f} MB)" for b, e in exports.items()))

    stores = {"numpy_memmap store, read-only view": open_feature_store(root / "numpy_memmap"),
              "numpy_memmap store, copy=True": open_feature_store(root / "numpy_memmap", copy=True),
              "hdf5 store": open_feature_store(root / "hdf5")}
    for store in stores.values():  # warm: index loaded, files open
        store.load(order[0])
    h5 = h5py.File(root / "feats.h5", "r")
    flat = np.memmap(root / "flat.f32", dtype=np.float32, mode="r")

    def make_runs(order: list[str]) -> dict:
        """``{reader name: function loading every utterance of order}`` (warm readers opened now)."""
        runs = {}
        for name, split_root in layouts.items():
            def cold(split_root=split_root):
                cache = ShardedParquetFeatureCache(split_root)
                for u in order:
                    cache.load(u, HASH)
                return cache

            warm = cold()

            def warm_run(warm=warm):
                for u in order:
                    warm.load(u, HASH)

            runs[f"sharded_parquet, {name}, warm"] = warm_run
            runs[f"sharded_parquet, {name}, cold"] = cold

        def h5py_read():
            for u in order:
                h5[u][()]

        def memmap_read():
            for u in order:
                start, frames = offsets[u]
                np.array(flat[start:start + frames * FEATURE_DIM]).reshape(frames, FEATURE_DIM)

        def memmap_view():
            for u in order:
                start, frames = offsets[u]
                flat[start:start + frames * FEATURE_DIM].reshape(frames, FEATURE_DIM)

        def store_reader(store):
            def read():
                for u in order:
                    store.load(u)
            return read

        runs.update({"h5py (dataset per utterance)": h5py_read, "np.memmap (flat file)": memmap_read,
                     "np.memmap (flat file), view, no copy": memmap_view,
                     **{name: store_reader(store) for name, store in stores.items()}})
        return runs

    sequential = list(arrays)[:len(order)]  # record order: what a non-shuffled epoch reads
    best = time_best(make_runs(order))
    best.update({f"{name}, sequential": seconds for name, seconds in time_best(make_runs(sequential)).items()})
    # the same cold read once more without the persisted shard indexes: every footer is parsed
    for split_root in layouts.values():
        for index in split_root.rglob(feature_cache.SHARD_INDEX_NAME):
            index.unlink()
    best.update({f"sharded_parquet, {name}, cold, footers": seconds for name, seconds in time_best(
        {name: make_runs(order)[f"sharded_parquet, {name}, cold"] for name in layouts}, rounds=1).items()})
    h5.close()
    for store in stores.values():
        store.close()
    return best


def dataloader_epochs(root: Path, arrays: dict[str, np.ndarray], output: Path, max_frames: int, epochs: int) -> dict:
    """batches/s and frames/s of one epoch (after a warm-up), best of ``epochs``, per reader."""
    try:
        import torch
        from torch.utils.data import DataLoader
    except ImportError:
        print("DataLoader: torch is not installed, skipped")
        return {}
    from asr_assets.data import DynamicBucketingSampler, FeatureDataset, collate_padded

    torch.set_num_threads(1)
    loaders = {}
    dataset = FeatureDataset(output, "train", frontend="squeezeformer")
    sampler = DynamicBucketingSampler(dataset, max_frames=max_frames, shuffle=True, seed=0)
    loaders["asr_assets FeatureDataset + DynamicBucketingSampler"] = (
        sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_padded, num_workers=2,
                            persistent_workers=True))
    try:
        import lhotse
        from lhotse.dataset.collation import collate_features
        from lhotse.dataset.sampling import DynamicBucketingSampler as LhotseSampler
    except ImportError:
        print("DataLoader: lhotse is not installed, its rows are skipped")
    else:
        class LhotseFeatures(torch.utils.data.Dataset):  # what K2SpeechRecognitionDataset's input strategy does
            def __getitem__(self, cuts):
                features, lengths = collate_features(cuts)
                return {"features": features, "feature_lengths": lengths, "utterance_ids": [c.id for c in cuts]}

        for writer_cls in (lhotse.LilcomChunkyWriter, lhotse.NumpyHdf5Writer):
            path = root / f"lhotse_{writer_cls.name}"
            t = time.perf_counter()
            cuts = []
            with writer_cls(path) as writer:
                for u, a in arrays.items():
                    key = writer.write(u, a)
                    features = lhotse.Features(type="fbank", num_frames=a.shape[0], num_features=FEATURE_DIM,
                                               frame_shift=0.01, sampling_rate=16000, start=0,
                                               duration=a.shape[0] * 0.01, storage_type=writer.name,
                                               storage_path=str(writer.storage_path), storage_key=key)
                    cuts.append(lhotse.MonoCut(id=u, start=0, duration=a.shape[0] * 0.01, channel=0, features=features))
            written = [f for f in root.rglob("*") if f.is_file() and f.relative_to(root).parts[0].startswith(path.name)]
            print(f"write: lhotse {writer_cls.name} {time.perf_counter() - t:.2f} s "
                  f"({sum(f.stat().st_size for f in written) / 1e6:.0f} MB)")
            cutset = lhotse.CutSet.from_cuts(cuts)
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")  # the cuts are in memory here
            lsampler = LhotseSampler(cutset, max_duration=max_frames * 0.01, shuffle=True, seed=0, num_buckets=10)
            loaders[f"lhotse {writer_cls.name} + DynamicBucketingSampler"] = (
                lsampler, DataLoader(LhotseFeatures(), sampler=lsampler, batch_size=None, num_workers=2,
                                     persistent_workers=True))
    results = {}
    for name, (smp, loader) in loaders.items():
        best = (float("inf"), 0, 0)
        for epoch in range(epochs + 1):
            smp.set_epoch(epoch)
            t = time.perf_counter()
            batches = frames = 0
            for batch in loader:
                batches += 1
                frames += int(batch["feature_lengths"].sum())
            seconds = time.perf_counter() - t
            if epoch and seconds < best[0]:  # epoch 0 warms the workers up
                best = (seconds, batches, frames)
        results[name] = best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=4000)
    parser.add_argument("--loads", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4, help="of the 64 shards, how many hold the utterances")
    parser.add_argument("--parts-per-shard", type=int, default=300, help="parts per shard of the 'grown' layout")
    parser.add_argument("--epochs", type=int, default=2, help="timed DataLoader epochs (after one warm-up)")
    parser.add_argument("--max-frames", type=int, default=20000, help="frames per DataLoader batch")
    args = parser.parse_args()

    arrays = make_arrays(args.utterances, args.shards)
    total_mb = sum(a.nbytes for a in arrays.values()) / 1e6
    root = Path(tempfile.mkdtemp(prefix="asr-readers-"))
    try:
        output = root / "out"
        layouts = {"one run": output / "feature-cache" / "train", "grown": root / "grown"}
        for name, split_root in layouts.items():
            seconds = write_parquet(split_root, arrays, None if name == "one run" else args.parts_per_shard)
            parts = [len(list_parts(shard_dir(split_root, s))) for s in range(args.shards)]
            size = sum(p.stat().st_size for p in split_root.rglob("part_*.parquet")) / 1e6
            print(f"write: sharded_parquet, {name}: {seconds:.2f} s ({size:.0f} MB), "
                  f"{min(parts)}-{max(parts)} parts per shard")
        write_record_cache(output, arrays)
        order = list(arrays)
        random.Random(1).shuffle(order)
        order = order[: args.loads]
        mb = sum(arrays[u].nbytes for u in order) / 1e6
        best = timed_loads(root, arrays, order, layouts)
        print(f"\n{args.utterances} utterances, {total_mb:.0f} MB float32, in {args.shards} of 64 shards; "
              f"{len(order)} loads, random (shuffled) and sequential (record order), best of 3\n")
        print("| reader | loads/s | MB/s | vs h5py (same order) |\n|---|---:|---:|---:|")
        sequential_mb = sum(arrays[u].nbytes for u in list(arrays)[:len(order)]) / 1e6
        for name, seconds in best.items():
            anchor = "h5py (dataset per utterance)" + (", sequential" if name.endswith(", sequential") else "")
            size = sequential_mb if name.endswith(", sequential") else mb
            print(f"| {name} | {len(order) / seconds:,.0f} | {size / seconds:,.0f} | {best[anchor] / seconds:.2f}x |")
        view, copy = best["numpy_memmap store, read-only view"], best["numpy_memmap store, copy=True"]
        print(f"\nnumpy_memmap store vs bare np.memmap: copy={best['np.memmap (flat file)'] / copy:.2f}x, "
              f"view={best['np.memmap (flat file), view, no copy'] / view:.2f}x (goal >= 0.5x)")
        loaders = dataloader_epochs(root, arrays, output, args.max_frames, args.epochs)
        if loaders:
            anchor = next((v for k, v in loaders.items() if "lilcom" in k.lower()), None)
            print(f"\nDataLoader, 2 workers, batches of <= {args.max_frames} frames, one epoch, best of {args.epochs}\n")
            print("| loader | batches | batches/s | frames/s | vs lhotse lilcom_chunky |\n|---|---:|---:|---:|---:|")
            for name, (seconds, batches, frames) in loaders.items():
                ratio = f"{(batches / seconds) / (anchor[1] / anchor[0]):.2f}x" if anchor else "-"
                print(f"| {name} | {batches} | {batches / seconds:,.1f} | {frames / seconds:,.0f} | {ratio} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
