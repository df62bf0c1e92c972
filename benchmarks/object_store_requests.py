"""Object-store request counts of ``asr-assets materialize`` from ``s3://`` manifests to an
``s3://`` output, against moto's S3 server started here on 127.0.0.1 (no network), then of the
no-op re-run.

Usage::

    python benchmarks/object_store_requests.py [--workers 2]

Uploads ``asr_assets_tests/data/{formats,en_hf}``, runs the graph and prints the requests by
method and kind of object (from the server's access log), the wall time, the record count and
the audio hours, and the requests per hour of audio. Needs the ``test`` extra (``moto[server]``,
``s3fs``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "s3://bench"
SOURCES = ("formats", "en_hf")
#: Substrings of an object path that name what it is, in the order they are tried.
KINDS = ("/part_", ".lock-", ".asr_assets_index", "_audio_blobs/", ".commit.json", ".versions/", "/reports/",
         "inputs.json", "probed_durations", "build.lock", ".stats-", "/manifests/")


def kind(method: str, target: str) -> str:
    """``"PUT /part_"``, ``"LIST out"`` ...: what one request was for."""
    path = target.split("?")[0]
    if "list-type=2" in target:
        return f"LIST {'manifests' if 'prefix=manifests' in target else 'output'}"
    for name in KINDS:
        if name in path:
            return f"{method} {name}"
    return f"{method} other"


def materialize(workers: int, log) -> tuple[collections.Counter, float]:
    """Requests by :func:`kind` and wall seconds of one ``asr-assets materialize``; ``log`` is
    the server's :class:`asr_assets_tests.servers.RequestCounter`."""
    from asr_assets.cli import main

    log.requests.clear()
    start = time.perf_counter()
    args = [a for name in SOURCES for a in ("--manifests", f"{BUCKET}/manifests/{name}")]
    if main(["materialize", *args, "--output", f"{BUCKET}/out", "--workers", str(workers)]) != 0:
        raise SystemExit("materialize failed")
    wall = time.perf_counter() - start
    time.sleep(0.3)  # the server logs a request after answering it
    return collections.Counter(kind(m, t) for m, t, _ in log.requests), wall


def print_counts(title: str, counts: collections.Counter, wall: float) -> None:
    print(f"\n{title}: {sum(counts.values())} requests in {wall:.1f} s wall")
    for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{n:7d}  {name}")
    by_method = collections.Counter()
    for name, n in counts.items():
        by_method[name.split(" ")[0]] += n
    print("  by method: " + ", ".join(f"{m} {n}" for m, n in sorted(by_method.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from asr_assets_tests.servers import moto_s3, s3_env

    work = Path(tempfile.mkdtemp(prefix="asr_assets_requests_"))
    with moto_s3() as (endpoint, log):
        os.environ.update(s3_env(endpoint), DAGSTER_HOME=str(work / "dagster_home"),
                          ASR_ASSETS_CACHE_DIR=str(work / "content-cache"))
        try:
            run(args.workers, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run(workers: int, log) -> None:
    """Upload the manifests, materialize twice, print the counts."""
    from asr_assets import storage
    from asr_assets.record_cache import RecordStore

    fs, _ = storage.filesystem(BUCKET)
    fs.mkdir(BUCKET.split("://")[1])
    data = ROOT / "asr_assets_tests" / "data"
    for name in SOURCES:
        for path in sorted((data / name).rglob("*")):
            if path.is_file():
                storage.put(f"{BUCKET}/manifests/{name}/{path.relative_to(data / name).as_posix()}",
                            path.read_bytes())
    counts, wall = materialize(workers, log)
    stores = [RecordStore(f"{BUCKET}/out/record_cache/{split}.jsonl") for split in ("train", "validation", "test")]
    records = sum(len(s) for s in stores)
    hours = sum(float(s.sidecars["num_samples"].sum()) for s in stores) / 16000 / 3600
    print_counts("first run", counts, wall)
    print(f"  {records} records, {hours * 3600:.1f} s of audio: {sum(counts.values()) / hours:,.0f} requests "
          "per hour of audio at this corpus's shard count (LIST and lock requests grow with shards, not hours)")
    counts, wall = materialize(workers, log)
    print_counts("no-op re-run", counts, wall)


if __name__ == "__main__":
    main()
