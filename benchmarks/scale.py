"""Scale benchmarks: how the record-cache build behaves at 10k / 100k / 1M manifest rows.

Generates Common Voice-like corpora (``validated.tsv`` with CV's columns plus ``duration``,
64-hex ``client_id`` speakers with ~20 clips each, sentences with punctuation, quotes, doubled
spaces, digits and non-ASCII words; no ``id`` column, so ids are the resolved clip paths). The
build stats every audio path (``require_readable_audio``, the default), so every clip exists:
hard links to a few 64-byte files (one inode per 60,000 clips; nothing is decoded, durations
come from the manifest).

Each measurement runs in a fresh child process (``--child``), which reports its wall time for
the build call and its peak RSS (``ru_maxrss``, imports included) plus that of its largest child
(the manifest reader process, :func:`asr_assets.manifest_batches.read_ahead_manifest_batches`,
which runs beside it). The anchor is the per-row
reference build (``asr_assets_tests/reference_record_cache.py``, the implementation before the
streaming one: one pass per split) in the same run.

    python benchmarks/scale.py [--rows 10000 100000 1000000] [--anchor-max-rows 100000] [--repeat 3] [--work DIR] [--hours 1]

Each size and implementation is built ``--repeat`` times, interleaved; the table gives the median
build time (and its rows/s), the range of rows/s, and the largest peak RSS.

One function per measurement (``measure_*``); ``main`` prints the table. Then, unless ``--hours 0``,
the end-to-end part of ``benchmarks/end_to_end.py``: ``asr-assets materialize`` on ``--hours`` of
real speech against lhotse's ``compute_and_store_features``, the no-op and the +1 % re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of to and in is was he for it with as his on be at by had not are but from or have an they which "
         "one you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well down "
         "café naïve straße Привіт світе 東京 İstanbul łódź").split()


def generate_corpus(folder: Path, rows: int, seed: int = 0) -> Path:
    """``folder/validated.tsv`` + ``folder/clips/`` with ``rows`` rows (kept if already complete)."""
    manifest = folder / "validated.tsv"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(seed)
    clips = folder / "clips"
    clips.mkdir(parents=True)
    speakers = ["%064x" % rng.getrandbits(256) for _ in range(max(1, rows // 20))]
    tiny = None
    with open(manifest, "w", encoding="utf-8") as out:
        out.write("client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\tduration\n")
        for i in range(rows):
            if i % 60000 == 0:  # ext4 allows 65,000 links per inode
                tiny = folder / f"tiny{i // 60000}.mp3"
                tiny.write_bytes(b"ID3" + b"\0" * 61)
            name = f"common_voice_en_{i:08d}.mp3"
            os.link(tiny, clips / name)
            sentence = " ".join(rng.choices(WORDS, k=rng.randint(3, 18))).capitalize()
            r = rng.random()
            if r < 0.05:
                sentence = f'"{sentence}," he said.'
            elif r < 0.1:
                sentence += " ?"
            elif r < 0.15:
                sentence = sentence.replace(" ", "  ") + "!"
            elif r < 0.18:
                sentence += " 42"
            else:
                sentence += "."
            out.write(f"{rng.choice(speakers)}\tclips/{name}\t{sentence}\t2\t0\t\t\t\ten\t\t{rng.uniform(1, 10):.3f}\n")
    done.write_text("ok")
    return folder


def _child(impl: str, corpus: str, output: str) -> None:
    import resource

    from asr_assets.settings import SPLITS, Settings

    settings = Settings(manifests=(corpus,), output=output)
    start = time.perf_counter()
    if impl == "streaming":
        from asr_assets.pipeline import build_record_caches

        results = build_record_caches(settings, SPLITS)
        records = sum(r.summary.utterances for r in results.values())
    else:
        sys.path.insert(0, str(REPO))
        from asr_assets_tests.reference_record_cache import build_record_cache_reference

        records = sum(build_record_cache_reference(settings, split)[0].utterances for split in SPLITS)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "records": records, "peak_rss_mib": peak / 1024}))


def measure_record_cache(corpus: Path, rows: int, impl: str) -> dict:
    """Build train/validation/test of ``corpus`` from scratch in a child process: wall seconds of
    the build, rows/s (manifest rows over the build's wall time), peak RSS of the child."""
    output = Path(tempfile.mkdtemp(prefix="asr_scale_"))
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, __file__, "--child", impl, str(corpus), str(output)], env=env,
                              check=True, capture_output=True, text=True, timeout=3600)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(output, ignore_errors=True)
    result.update(rows=rows, impl=impl, rows_per_s=rows / result["seconds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--anchor-max-rows", type=int, default=100_000,
                        help="run the per-row reference only up to this many rows (it is ~10x slower)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "asr_assets_scale"),
                        help="where the generated corpora are kept between runs")
    parser.add_argument("--hours", type=float, default=1.0,
                        help="end to end (benchmarks/end_to_end.py) on this many hours of real speech; 0 skips it")
    parser.add_argument("--workers", type=int, default=2, help="feature workers of the end-to-end runs")
    parser.add_argument("--repeat", type=int, default=3,
                        help="builds per size and implementation, interleaved; the table gives the median "
                             "(the machine is shared: single builds of 1M rows moved between 48k and 81k rows/s)")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "CORPUS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    print(f"load average at start {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'rows':>9} {'implementation':<22} {'build s':>8} {'rows/s':>9} {'rows/s range':>15} "
          f"{'peak RSS MiB':>13} {'speedup':>8}   (median of {args.repeat}, peak RSS the largest)")
    for rows in args.rows:
        corpus = generate_corpus(Path(args.work) / f"cv_{rows}", rows)
        impls = ["streaming"] + (["reference"] if rows <= args.anchor_max_rows else [])
        runs = {impl: [] for impl in impls}
        for _ in range(max(1, args.repeat)):  # interleaved: a load spike hits both implementations
            for impl in impls:
                runs[impl].append(measure_record_cache(corpus, rows, impl))
        medians = {impl: statistics.median(r["seconds"] for r in results) for impl, results in runs.items()}
        anchor = medians.get("reference")
        for impl, results in runs.items():
            seconds = medians[impl]
            speeds = sorted(r["rows_per_s"] for r in results)
            speedup = f"{anchor / seconds:.1f}x" if anchor else "-"
            name = "streaming (one pass)" if impl == "streaming" else "per-row reference"
            spread = f"{speeds[0]:,.0f}-{speeds[-1]:,.0f}"
            print(f"{rows:>9,} {name:<22} {seconds:>8.2f} {rows / seconds:>9,.0f} {spread:>15} "
                  f"{max(r['peak_rss_mib'] for r in results):>13.0f} {speedup:>8}", flush=True)
    if args.hours > 0:  # no-op, +1 % and the lhotse comparison (benchmarks/end_to_end.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import end_to_end

        end_to_end.print_table(end_to_end.measure(args.hours, args.workers, repeat=max(1, args.repeat)))


if __name__ == "__main__":
    main()
