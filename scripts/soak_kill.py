"""Soak test (not in CI): SIGKILL `asr-assets materialize` at random moments, re-run, compare.

Each iteration starts a fresh output folder, kills the CLI and its extraction workers (SIGKILL to
the process group) after a random delay in [0, T], where T is the uninterrupted run's duration,
then re-runs to completion and compares records (byte-identical JSONL) and features (|Δ| ≤ 1e-5)
with the uninterrupted reference. Prints the tally.

    python scripts/soak_kill.py [--iterations 100] [--manifests PATH]... [--workdir /tmp/asr_assets_soak]

Run from the repository root with the test extra installed (it reuses the tests' snapshot helper).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asr_assets_tests.test_reliability import _snapshot as snapshot  # noqa: E402  (records, features)


def same(a, b) -> bool:
    if a[0] != b[0] or a[1].keys() != b[1].keys():
        return False
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
               and np.max(np.abs(x - y), initial=0) <= 1e-5) for k in a[1] for x, y in [(a[1][k], b[1][k])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--manifests", action="append", default=[])
    parser.add_argument("--workdir", default="/tmp/asr_assets_soak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster_home")}

    def cmd(out: Path) -> list[str]:
        extra = [x for m in args.manifests for x in ("--manifests", m)]
        return [sys.executable, "-m", "asr_assets.cli", "materialize", "--output", str(out), *extra]

    start = time.monotonic()
    subprocess.run(cmd(work / "reference"), env=env, check=True, capture_output=True)
    duration = time.monotonic() - start
    reference = snapshot(work / "reference")
    rng = random.Random(args.seed)
    tally = {"iterations": 0, "killed_before_end": 0, "consistent": 0, "inconsistent": 0, "rerun_failed": 0}
    for i in range(args.iterations):
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        delay = rng.uniform(0, duration)
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            tally["killed_before_end"] += 1
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        tally["iterations"] += 1
        rerun = subprocess.run(cmd(out), env=env, capture_output=True)
        if rerun.returncode != 0:
            tally["rerun_failed"] += 1
            print(f"[{i}] re-run after kill at {delay:.2f}s failed:\n{rerun.stderr.decode()[-2000:]}", flush=True)
            continue
        ok = same(reference, snapshot(out))
        tally["consistent" if ok else "inconsistent"] += 1
        print(f"[{i}] kill at {delay:5.2f}s of {duration:.1f}s -> {'consistent' if ok else 'INCONSISTENT'}", flush=True)
    print("tally:", tally)
    sys.exit(0 if tally["inconsistent"] == tally["rerun_failed"] == 0 else 1)


if __name__ == "__main__":
    main()
