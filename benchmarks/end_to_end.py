"""End to end on one hour of real speech: ``asr-assets materialize`` against lhotse, plus the no-op
and +1 % re-runs.

Usage::

    PYTHONPATH=. python benchmarks/end_to_end.py [--hours 1.0] [--workers 2] [--data DIR] [--repeat 3]

The corpus is built first, from real speech only: the clips of ``--data`` (default: the in-repo
test data, ``asr_assets_tests/data``; ``../shared/data`` has more) are decoded, resampled to
16 kHz mono and written as FLAC files with a Common-Voice-like ``manifest.tsv`` (``id, path,
sentence, duration, client_id``), repeated under new ids until ``--hours`` is reached. Both tools
then read the same FLAC files:

* **asr_assets**: ``asr-assets materialize --manifests <corpus> --output <out> --workers N``, a
  fresh process as a user runs it (Dagster start-up, record cache, squeezeformer fbank into the
  sharded Parquet cache, the checks);
* **lhotse** (when installed, with ``lilcom``): a fresh process that builds the ``RecordingSet``
  (``Recording.from_file`` per file) and ``SupervisionSet`` from the same TSV, then
  ``CutSet.compute_and_store_features(Fbank(), storage_type=LilcomChunkyWriter, num_jobs=N)``:
  what icefall's ``compute_fbank_*.py`` scripts do;
* **no-op**: ``asr-assets materialize`` again over the unchanged corpus (every file's mtime is
  compared before and after: nothing may be rewritten);
* **+1 %**: 1 % new rows appended to the manifest, then ``asr-assets materialize``. Its goal is
  ``<= no-op + 1.5 x the featurization of the new rows``, where the featurization of the new rows is
  the library's own feature stage of the first run (``build_feature_shards``, measured without
  Dagster in this process) scaled by the share of new audio.

The library's feature stage also gives the write stage beside the computation: seconds the main
process spent writing parts and shard indexes (``ShardStats.write_seconds``: encode, zstd, fsync,
rename) against the workers' seconds of decoding and featurizing (``worker_seconds``); goal
``<= 0.5x``.

The goals of issue 10 are printed beside the figures: materialize ``<= 0.8 x`` lhotse's wall time,
a no-op ``<= 5 s``. The first run and lhotse are each timed ``--repeat`` times, interleaved, and
the +1 % run as often from copies of the same state; the table gives medians and every run (on
the shared 2-core VM single runs moved by ±25 %: lhotse took 5.3 s and 7.9 s in two runs an hour
apart).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr_assets.audio import load_audio  # noqa: E402

LHOTSE_SCRIPT = textwrap.dedent('''
    import csv, sys, time
    from lhotse import (CutSet, Fbank, LilcomChunkyWriter, Recording, RecordingSet, SupervisionSegment,
                        SupervisionSet)
    corpus, out, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(f"{corpus}/manifest.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\\t"))
    recordings = RecordingSet.from_recordings(Recording.from_file(f"{corpus}/{r['path']}", recording_id=r["id"])
                                              for r in rows)
    supervisions = SupervisionSet.from_segments(
        SupervisionSegment(id=r["id"], recording_id=r["id"], start=0, duration=recordings[r["id"]].duration,
                           text=r["sentence"], speaker=r["client_id"]) for r in rows)
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=supervisions)
    cuts = cuts.compute_and_store_features(extractor=Fbank(), storage_path=f"{out}/feats", num_jobs=jobs,
                                           storage_type=LilcomChunkyWriter)
    cuts.to_file(f"{out}/cuts.jsonl.gz")
    print(len(cuts))
''')


def speech_clips(data: Path) -> list[tuple[np.ndarray, str]]:
    """Every decodable clip under ``data`` as 16 kHz mono float32 with its file stem as text."""
    clips = []
    for path in sorted(p for p in data.rglob("*") if p.suffix.lower() in {".wav", ".flac", ".ogg", ".opus", ".mp3"}):
        if "broken" in path.parts:
            continue
        try:
            samples = load_audio(str(path), target_rate=16000)
        except Exception:
            continue
        if 0.5 * 16000 <= len(samples) <= 20 * 16000 and np.isfinite(samples).all():
            clips.append((samples, path.stem.replace("_", " ")))
    if not clips:
        raise SystemExit(f"no speech clips under {data}")
    return clips


def write_corpus(root: Path, clips, seconds: float, start: int = 0, rows: list | None = None) -> list[dict]:
    """FLAC files + ``manifest.tsv`` under ``root`` totalling ``seconds`` of audio (appends to ``rows``)."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else []
    total, i = 0.0, start
    while total < seconds:
        samples, text = clips[i % len(clips)]
        name = f"audio/utt{i:06d}.flac"
        sf.write(root / name, samples, 16000, format="FLAC", subtype="PCM_16")
        duration = len(samples) / 16000
        rows.append({"id": f"utt{i:06d}", "path": name, "sentence": f"{text} {i}", "duration": f"{duration:.3f}",
                     "client_id": f"spk{i % 40:02d}"})
        total += duration
        i += 1
    with open(root / "manifest.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def file_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def library_feature_stage(corpus: Path, workers: int) -> tuple[float, float, float, float]:
    """(seconds of build_feature_shards over all splits, audio seconds, seconds the main process
    spent writing parts and indexes, worker seconds decoding and featurizing) without Dagster."""
    from asr_assets.pipeline import build_feature_shards, build_record_cache
    from asr_assets.settings import SPLITS, Settings

    out = Path(tempfile.mkdtemp(prefix="asr-e2e-lib-"))
    try:
        settings = Settings(manifests=(str(corpus),), output=str(out), workers=workers, frontends=("squeezeformer",))
        for split in SPLITS:
            build_record_cache(settings, split)
        start, audio, write, compute = time.perf_counter(), 0.0, 0.0, 0.0
        for split in SPLITS:
            stats = build_feature_shards(settings, "squeezeformer", split, range(64)).values()
            audio += sum(s.audio_seconds for s in stats)
            write += sum(s.write_seconds for s in stats)
            compute += sum(s.worker_seconds for s in stats)
        return time.perf_counter() - start, audio, write, compute
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(hours: float = 1.0, workers: int = 2, data: Path = REPO / "asr_assets_tests" / "data",
            repeat: int = 3) -> dict:
    """Build the corpus and time the runs; returns the figures (seconds, medians of ``repeat``
    runs where timed more than once) and counts.

    The first run and lhotse are timed ``repeat`` times, interleaved (asr_assets, lhotse,
    asr_assets, ...), each into a fresh output folder (and a fresh ``DAGSTER_HOME`` for
    asr_assets), so that a change of the shared machine's load between them moves both. The
    +1 % run is timed ``repeat`` times from copies of the same state (output, Dagster instance)."""
    root = Path(tempfile.mkdtemp(prefix="asr-e2e-"))
    try:
        clips = speech_clips(data)
        corpus = root / "corpus"
        rows = write_corpus(corpus, clips, hours * 3600)
        figures = {"files": len(rows), "hours": sum(float(r["duration"]) for r in rows) / 3600, "clips": len(clips),
                   "workers": workers, "data": str(data), "repeat": repeat}
        try:
            import lhotse  # noqa: F401
            import lilcom  # noqa: F401
            have_lhotse = True
        except ImportError:
            print("lhotse or lilcom not installed: the lhotse row is skipped")
            have_lhotse = False

        def asr(out: Path) -> list[str]:
            return [sys.executable, "-m", "asr_assets.cli", "materialize", "--manifests", str(corpus),
                    "--output", str(out), "--workers", str(workers), "--frontend", "squeezeformer"]

        def home_env(home: Path) -> dict:
            home.mkdir(exist_ok=True)
            return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}

        firsts, lhotses = [], []
        for i in range(repeat):
            out, home = root / f"out{i}", root / f"dagster_home{i}"
            env = home_env(home)
            firsts.append(timed(asr(out), env=env))
            if have_lhotse:
                lhotses.append(timed([sys.executable, "-c", LHOTSE_SCRIPT, str(corpus), str(root / f"lhotse{i}"),
                                      str(workers)], env={**env, "OMP_NUM_THREADS": "1"}))
                shutil.rmtree(root / f"lhotse{i}", ignore_errors=True)
            if i < repeat - 1:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(home, ignore_errors=True)
        figures["first"], figures["first_all"] = float(np.median(firsts)), firsts
        figures["lhotse"] = float(np.median(lhotses)) if lhotses else None
        figures["lhotse_all"] = lhotses
        out, home = root / f"out{repeat - 1}", root / f"dagster_home{repeat - 1}"
        env = home_env(home)
        before = file_times(out)
        figures["noop"] = timed(asr(out), env=env)
        figures["rewritten"] = sum(1 for p, t in file_times(out).items() if before.get(p) != t)
        figures["feature_stage"], audio, figures["write_s"], figures["compute_s"] = library_feature_stage(corpus, workers)
        new_rows = write_corpus(corpus, clips, 0.01 * figures["hours"] * 3600, start=len(rows), rows=list(rows))[len(rows):]
        figures["new_rows"], figures["new_audio"] = len(new_rows), sum(float(r["duration"]) for r in new_rows)
        shutil.copytree(out, root / "out_before_plus")
        shutil.copytree(home, root / "home_before_plus")
        pluses = []
        for i in range(repeat):
            if i:  # the same state again: output and instance as they were before the +1 % run
                shutil.rmtree(out)
                shutil.rmtree(home)
                shutil.copytree(root / "out_before_plus", out)
                shutil.copytree(root / "home_before_plus", home)
            pluses.append(timed(asr(out), env=env))
        figures["plus"], figures["plus_all"] = float(np.median(pluses)), pluses
        figures["plus_budget"] = figures["noop"] + 1.5 * figures["feature_stage"] * figures["new_audio"] / audio
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _runs(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def print_table(f: dict) -> None:
    print(f"\n{f['hours']:.2f} h of real speech ({f['files']} FLAC files from {f['clips']} clips), {f['workers']} workers, "
          "squeezeformer fbank (lhotse: Fbank, LilcomChunkyWriter)\n")
    print(f"| run | wall s (median of {f['repeat']}) | goal |\n|---|---:|---|")
    ratio = ""
    if f["lhotse"]:
        pairs = [a / b for a, b in zip(f["first_all"], f["lhotse_all"])]
        ratio = f" ({f['first'] / f['lhotse']:.2f}x lhotse; run by run {min(pairs):.2f}-{max(pairs):.2f}x)"
    print(f"| asr-assets materialize, first run | {f['first']:.1f}{ratio} [{_runs(f['first_all'])}] | <= 0.8x lhotse |")
    if f["lhotse"]:
        print(f"| lhotse compute_and_store_features | {f['lhotse']:.1f} [{_runs(f['lhotse_all'])}] | |")
    print(f"| library feature stage alone (build_feature_shards, no Dagster) | {f['feature_stage']:.1f} | |")
    print(f"| of which writing parts + indexes (main process) vs decoding + featurizing (worker time) | "
          f"{f['write_s']:.2f} vs {f['compute_s']:.2f} ({f['write_s'] / max(f['compute_s'], 1e-9):.2f}x) | <= 0.5x |")
    print(f"| asr-assets materialize, no-op ({f['rewritten']} files rewritten) | {f['noop']:.2f} | <= 5 s, 0 files |")
    print(f"| asr-assets materialize, +1 % ({f['new_rows']} rows, {f['new_audio']:.0f} s) | {f['plus']:.2f} "
          f"[{_runs(f['plus_all'], 2)}] | "
          f"<= {f['plus_budget']:.2f} s (no-op + 1.5x featurizing the new rows) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO / "asr_assets_tests" / "data")
    parser.add_argument("--repeat", type=int, default=3,
                        help="first runs and lhotse runs (interleaved) and +1 %% runs to take the median of (default: 3)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    print_table(measure(args.hours, args.workers, args.data, args.repeat))


if __name__ == "__main__":
    main()
