"""Random-access read speed of the feature cache against h5py and a bare np.memmap.

Usage::

    PYTHONPATH=. python benchmarks/readers.py [--utterances 4000] [--loads 2000] [--rows-per-part 256]

One run writes the same float32 ``[frames, 80]`` arrays (frames drawn like 2-15 s utterances)
three ways: the sharded Parquet cache (64 shards, parts of ``--rows-per-part`` rows, as the
extractor writes them), an HDF5 file with one dataset per utterance (SpeechBrain/lhotse style),
and one flat float32 file read through ``np.memmap`` with an offsets index. It then times
``--loads`` loads of shuffled utterance ids (the same order for every reader). The Parquet cache
is also exported (``asr_assets.stores.export_feature_store``) to a ``numpy_memmap`` and an
``hdf5`` store, read through ``open_feature_store`` like the training side does; a bare
``np.memmap`` slice without the copy is the yardstick of the store's read-only views:

* *warm*: the reader has already indexed its shards and opened its files;
* *cold*: a fresh reader object (the OS page cache is warm: this measures our own start-up,
  indexing and opening, not the disk).

It prints loads/s, MB/s and the ratio to h5py, plus file sizes and write times. The figures
move by ~15 % between runs on a shared 2-core VM; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr_assets.feature_cache import ShardedParquetFeatureCache, ShardWriter, cache_key, shard_index  # noqa: E402
from asr_assets.stores import export_feature_store, open_feature_store  # noqa: E402

HASH = "0a48384efcf3"  # squeezeformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=4000)
    parser.add_argument("--loads", type=int, default=2000)
    parser.add_argument("--rows-per-part", type=int, default=256)
    args = parser.parse_args()
    import h5py

    rng = np.random.default_rng(0)
    ids = [f"utt-{i:07d}" for i in range(args.utterances)]
    arrays = {u: rng.standard_normal((int(rng.integers(200, 1500)), 80)).astype(np.float32) for u in ids}
    total_mb = sum(a.nbytes for a in arrays.values()) / 1e6
    root = Path(tempfile.mkdtemp(prefix="asr-readers-"))
    try:
        t = time.perf_counter()
        by_shard: dict[int, list[str]] = {}
        for u in ids:
            by_shard.setdefault(shard_index(cache_key(u, HASH)), []).append(u)
        for shard, utts in by_shard.items():
            with ShardWriter(root / "parquet", shard, rows_per_part=args.rows_per_part) as writer:
                for u in utts:
                    writer.add(cache_key(u, HASH), arrays[u])
        write_parquet = time.perf_counter() - t
        t = time.perf_counter()
        with h5py.File(root / "feats.h5", "w") as h5:
            for u in ids:
                h5.create_dataset(u, data=arrays[u])
        write_h5 = time.perf_counter() - t
        offsets, pos = {}, 0
        with open(root / "flat.f32", "wb") as fh:
            for u in ids:
                offsets[u] = (pos, arrays[u].shape[0])
                fh.write(arrays[u].tobytes())
                pos += arrays[u].size
        exports = {}
        for backend in ("numpy_memmap", "hdf5"):  # asr-assets export, from the Parquet cache just written
            exports[backend] = export_feature_store(root / "parquet", root / backend, backend=backend, frontend=HASH,
                                                    utterance_ids=ids)
        order = ids[:]
        random.Random(1).shuffle(order)
        order = order[: args.loads]
        mb = sum(arrays[u].nbytes for u in order) / 1e6

        def parquet_cold():
            cache = ShardedParquetFeatureCache(root / "parquet")
            for u in order:
                cache.load(u, HASH)
            return cache

        warm = parquet_cold()

        def parquet_warm():
            for u in order:
                warm.load(u, HASH)

        h5 = h5py.File(root / "feats.h5", "r")

        def h5py_read():
            for u in order:
                h5[u][()]

        flat = np.memmap(root / "flat.f32", dtype=np.float32, mode="r")

        def memmap_read():
            for u in order:
                start, frames = offsets[u]
                np.array(flat[start:start + frames * 80]).reshape(frames, 80)

        def memmap_view():
            for u in order:
                start, frames = offsets[u]
                flat[start:start + frames * 80].reshape(frames, 80)

        stores = {"numpy_memmap store, read-only view": open_feature_store(root / "numpy_memmap"),
                  "numpy_memmap store, copy=True": open_feature_store(root / "numpy_memmap", copy=True),
                  "hdf5 store": open_feature_store(root / "hdf5")}
        for store in stores.values():  # warm: index loaded, files open
            store.load(order[0])

        def store_reader(store):
            def read():
                for u in order:
                    store.load(u)
            return read

        runs = {"sharded_parquet warm": parquet_warm, "sharded_parquet cold": parquet_cold,
                "h5py (dataset per utterance)": h5py_read, "np.memmap (flat file)": memmap_read,
                "np.memmap (flat file), view, no copy": memmap_view,
                **{name: store_reader(store) for name, store in stores.items()}}
        best = {name: float("inf") for name in runs}
        for _ in range(3):  # interleaved rounds, best of 3
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        parts = len(list((root / "parquet").rglob("part_*.parquet")))
        size_pq = sum(p.stat().st_size for p in (root / "parquet").rglob("part_*.parquet")) / 1e6
        print(f"{args.utterances} utterances, {total_mb:.0f} MB float32, {parts} parts "
              f"({args.rows_per_part} rows/part, 64 shards); {args.loads} random loads, best of 3")
        print(f"write: sharded_parquet {write_parquet:.2f} s ({size_pq:.0f} MB), h5py {write_h5:.2f} s "
              f"({(root / 'feats.h5').stat().st_size / 1e6:.0f} MB)\n")
        print("| reader | loads/s | MB/s | vs h5py |\n|---|---:|---:|---:|")
        for name, seconds in best.items():
            print(f"| {name} | {len(order) / seconds:,.0f} | {mb / seconds:,.0f} | "
                  f"{best['h5py (dataset per utterance)'] / seconds:.2f}x |")
        print(f"\nexport (asr_assets.stores.export_feature_store from the Parquet cache): " + ", ".join(
            f"{b} {e.seconds:.2f} s ({sum(p.stat().st_size for p in e.path.iterdir()) / 1e6:.0f} MB)"
            for b, e in exports.items()))
        view, copy = best["numpy_memmap store, read-only view"], best["numpy_memmap store, copy=True"]
        print(f"numpy_memmap store vs bare np.memmap: copy={copy and best['np.memmap (flat file)'] / copy:.2f}x, "
              f"view={best['np.memmap (flat file), view, no copy'] / view:.2f}x (goal >= 0.5x)")
        h5.close()
        for store in stores.values():
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
