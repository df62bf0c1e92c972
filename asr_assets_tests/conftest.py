"""Shared fixtures: where the real-speech test data lives, the bundled sample, small corpora.

Real speech comes from ``asr_assets_tests/data`` in the repo (a subset of the project's full data
set, made by ``scripts/make_test_data.py``; see its README), or from ``$ASR_ASSETS_TEST_DATA`` when
set (e.g. the full set, same layout). Missing data is an error, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_REPO_DATA = REPO / "asr_assets_tests" / "data"
TEST_DATA = Path(os.environ.get("ASR_ASSETS_TEST_DATA") or IN_REPO_DATA).resolve()
_CORPORA = ("formats/manifest.tsv", "formats/audio", "broken/manifest.tsv", "broken/audio",
            "en_hf/data", "nl_cv/validated.tsv", "nl_cv/clips")


def require_test_data() -> Path:
    """``TEST_DATA``, after checking that every corpus the tests read is there (FileNotFoundError if not)."""
    missing = [c for c in _CORPORA if not (TEST_DATA / c).exists()]
    if missing:
        where = "$ASR_ASSETS_TEST_DATA" if os.environ.get("ASR_ASSETS_TEST_DATA") else "the in-repo test data"
        raise FileNotFoundError(f"{where} at {TEST_DATA} lacks {', '.join(missing)} "
                                "(see asr_assets_tests/data/README.md)")
    return TEST_DATA


@pytest.fixture(scope="session")
def test_data() -> Path:
    return require_test_data()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's ASR_ASSETS_* or DAGSTER_HOME."""
    for var in ("ASR_ASSETS_MANIFESTS", "ASR_ASSETS_OUTPUT", "ASR_ASSETS_FRONTENDS", "ASR_ASSETS_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail loudly if anything tries to spawn a process (e.g. an ffmpeg executable)."""
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess spawned: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def rows_per_key(root: Path) -> "collections.Counter[str]":
    """How many rows (payloads and tombstones) every key has across the ``part_*.parquet`` files
    below ``root``: 1 everywhere means every key was written once."""
    import collections

    import pyarrow.parquet as pq

    counts: collections.Counter = collections.Counter()
    for part in sorted(root.rglob("part_*.parquet")):
        counts.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    return counts
