"""Shared fixtures: where the real-speech test data lives, the bundled sample, small corpora.

Real speech comes from the project's shared data folder (``../shared/data`` beside the repo, or
``$ASR_ASSETS_TEST_DATA``); tests that need it are skipped with a reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASR_ASSETS_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
needs_shared_data = pytest.mark.skipif(not (SHARED_DATA / "formats").is_dir(),
                                       reason=f"shared test data not found at {SHARED_DATA}")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "formats").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's ASR_ASSETS_* or DAGSTER_HOME."""
    for var in ("ASR_ASSETS_MANIFESTS", "ASR_ASSETS_OUTPUT", "ASR_ASSETS_FRONTENDS", "ASR_ASSETS_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
