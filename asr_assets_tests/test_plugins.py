"""Pluggable frontends and upstream-style overrides through the whole graph: a user module registers
a frontend and `asr-assets materialize --plugin ... --frontend ...` caches it with the same machinery;
`--n-fft 512` caches squeezeformer under train.py's hash 3432c2cdb779 with its frame count."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from asr_assets import RecordStore, ShardedParquetFeatureCache
from asr_assets.audio import load_audio
from asr_assets.cli import main as cli_main
from asr_assets.frontends.base import render_config_repr
from asr_assets.settings import SPLITS, bundled_sample_manifests
from asr_assets_tests.test_graph import independent_features


def _records(out):
    for split in SPLITS:
        for record in RecordStore(out / "record_cache" / f"{split}.jsonl"):
            yield split, record


def test_plugin_frontend_is_cached_like_the_builtins(tmp_path):
    out = tmp_path / "out"
    assert cli_main(["materialize", "--manifests", bundled_sample_manifests()[1], "--output", str(out),
                     "--plugin", "asr_assets_tests.plugin_example", "--frontend", "frame-energy", "--workers", "2"]) == 0
    repr_ = render_config_repr({"type": "frame-energy", "frame_length": 400, "hop_length": 160, "floor": 1e-10})
    frontend_hash = hashlib.sha256(repr_.encode()).hexdigest()[:12]
    from asr_assets_tests.plugin_example import frame_energy

    n = 0
    for split, record in _records(out):
        feats = independent_features(out / "feature-cache" / split, record["utterance_id"], frontend_hash)
        samples = load_audio(record["audio_path"])
        np.testing.assert_allclose(feats, frame_energy(samples), atol=1e-6)
        n += 1
    assert n == 8


def test_n_fft_override_keys_the_cache_like_train_py(tmp_path):
    out = tmp_path / "out"
    assert cli_main(["materialize", "--manifests", bundled_sample_manifests()[1], "--output", str(out),
                     "--n-fft", "512", "--workers", "2"]) == 0
    for split, record in _records(out):
        feats = independent_features(out / "feature-cache" / split, record["utterance_id"], "3432c2cdb779")
        n = len(load_audio(record["audio_path"]))
        assert feats.shape == (max(n, 512) // 160 + 1, 80)
        assert ShardedParquetFeatureCache(out / "feature-cache" / split).load(record["utterance_id"]) is None  # not 0a48384efcf3
    with pytest.raises(SystemExit) as bad_value:
        cli_main(["materialize", "--output", str(out), "--n-fft", "banana"])
    assert bad_value.value.code == 2
