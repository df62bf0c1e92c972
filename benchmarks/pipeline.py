"""End-to-end feature extraction speed and peak memory: record cache -> decode -> features -> shards.

Prints, per corpus and worker count: seconds of audio, wall time, × real time (wall, all workers),
× real time per busy worker core (decode + features, from the workers' own timers), and the peak
resident memory of the main process and of the largest worker (``ru_maxrss``; with one worker
the work runs in the main process, so both are the same process).

    python benchmarks/pipeline.py [--manifests PATH]... [--workers 1 2] [--frontend squeezeformer]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from asr_assets.pipeline import build_feature_shards, build_record_cache
from asr_assets.settings import SPLITS, Settings

#: the speech that ships in the repo (``--manifests ../shared/data/en_hf`` etc. for more)
DATA = Path(__file__).resolve().parents[1] / "asr_assets_tests" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", action="append", default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frontend", default="squeezeformer")
    args = parser.parse_args()
    corpora = args.manifests or [str(DATA / "en_hf"), str(DATA / "nl_cv"), str(DATA / "formats")]
    print(f"{'corpus':<10} {'workers':>7} {'audio s':>8} {'wall s':>7} {'xRT wall':>9} {'xRT/core':>9} "
          f"{'main MB':>8} {'worker MB':>9}")
    for corpus in corpora:
        for workers in args.workers:
            out = Path(tempfile.mkdtemp(prefix="asr_assets_bench_"))
            try:
                settings = Settings(manifests=(corpus,), output=str(out), workers=workers, frontends=(args.frontend,))
                for split in SPLITS:
                    build_record_cache(settings, split)
                start = time.perf_counter()
                audio = busy = worker_mb = 0.0
                for split in SPLITS:
                    for stats in build_feature_shards(settings, args.frontend, split, range(64)).values():
                        audio += stats.audio_seconds
                        busy += stats.worker_seconds
                        worker_mb = max(worker_mb, stats.worker_peak_rss_mib)
                wall = time.perf_counter() - start
                main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{Path(corpus).name:<10} {workers:>7} {audio:>8.0f} {wall:>7.2f} {audio / wall:>9.0f} "
                      f"{audio / max(busy, 1e-9):>9.0f} {main_mb:>8.0f} {worker_mb:>9.0f}", flush=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
