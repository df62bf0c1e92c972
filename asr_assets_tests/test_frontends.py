"""Frontend API, cache keys, frame counts, edge cases and pinned vectors (spec sections 3.2, 4, 5).

Covers the registry (``get_frontend``, ``available_frontends``, overrides), upstream-identical
config reprs and hashes, ``py_float``, exact and estimated frame counts, the derived test
vectors of spec section 5, the constant-column rule, resampling and down-mixing in
``__call__``, batching, pickling, and that the package imports without dagster.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asr_assets.errors import FeatureConfigError, UnknownFrontendError
from asr_assets.frontends import (
    Frontend,
    available_frontends,
    compute_features,
    get_frontend,
    py_float,
)
from asr_assets.frontends.base import normalize_columns

REPO = Path(__file__).resolve().parents[1]
SPEC_VECTORS = REPO / "asr_assets_tests" / "data" / "spec_vectors_derived.json"  # spec section 5

SQUEEZEFORMER_REPR = (
    "{'featurizer': {'sample_rate': 16000, 'n_fft': 400, 'win_length': 400, 'n_mels': 80, "
    "'backend': 'torchaudio', 'preemphasis': 0.97, 'normalize_signal': True, "
    "'normalize_feature': True, 'normalize_per_frame': False, 'hop_length': 160}}"
)
W2V_BERT_REPR = (
    "{'featurizer': {'type': 'w2v_bert', 'model_source': 'facebook/w2v-bert-2.0', "
    "'sample_rate': 16000, 'feature_size': 80, 'stride': 2, 'feature_dim': 160, "
    "'padding_value': 1.0}}"
)

# Spec section 5, derived from an independent float64 restatement (tolerance ~1e-4).
DERIVED = {
    "squeezeformer": ((101, 80), [7.21694, 6.86009, 6.94934, 6.98322], [7.43794, 7.47117, 7.46305, 7.45423]),
    "zipformer": ((101, 80), [2.64353, 3.93002, 3.85071, 3.74828], [1.65887, 1.30065, 1.08752, 0.97009]),
    "w2v-bert": ((49, 160), [1.86735, 3.35442, 3.64167, 3.77084], [2.10075, 1.97342, 1.84915, 1.69727]),
}


def derived_input() -> np.ndarray:
    """Spec section 5 input: chirp + windowed sine, float64 computed, float32 cast."""
    n = np.arange(16000)
    t = n / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.1 * np.sin(0.37 * n) * np.exp(-((t - 0.5) ** 2) / 0.02)
    return x.astype(np.float32)


# ------------------------------------------------------------------------------- registry / keys


def test_available_frontends_lists_builtins():
    names = available_frontends()
    assert names == sorted(names)
    for name in ("squeezeformer", "zipformer", "w2v-bert", "ludwig-fbank", "ludwig-stft",
                 "ludwig-stft_phase", "ludwig-group_delay", "ludwig-raw"):
        assert name in names


def test_unknown_frontend_lists_available():
    with pytest.raises(UnknownFrontendError) as err:
        get_frontend("squeezformer")
    assert "'squeezformer'" in str(err.value)
    assert "zipformer" in str(err.value) and "w2v-bert" in str(err.value)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "name, repr_string, hash12",
    [
        ("squeezeformer", SQUEEZEFORMER_REPR, "0a48384efcf3"),
        (
            "zipformer",
            SQUEEZEFORMER_REPR.replace("'preemphasis': 0.97", "'preemphasis': 0.0")
            .replace("'normalize_signal': True", "'normalize_signal': False")
            .replace("'normalize_feature': True", "'normalize_feature': False"),
            "4d9c4bc8f09a",
        ),
        ("w2v-bert", W2V_BERT_REPR, "c62e513533e1"),
    ],
)
def test_upstream_repr_and_hash_are_pinned(name, repr_string, hash12):
    fe = get_frontend(name)
    assert fe.config_repr() == repr_string
    assert fe.frontend_hash() == hash12
    assert hashlib.sha256(repr_string.encode()).hexdigest()[:12] == hash12
    # the repr of the plain dict is Python's own repr for the defaults
    assert repr({"featurizer": fe.config_dict()}) == repr_string


def test_cache_key_examples_from_spec():
    expected = {
        "squeezeformer": ("cfc05ec3688713645ff1287417d256d1cea2aa006ecf949922031ea9a5d151c8", 3),
        "zipformer": ("b24311cbe82f6db7ac1a0683909b3ed979bc087c52d8e64cac5d5f4c5482fedc", 11),
        "w2v-bert": ("a87946cbc8bf5dc1d2fd81b94e5da55d81d00c69db30cef8a64de9996657eb66", 11),
    }
    for name, (key, shard) in expected.items():
        got = hashlib.sha256(f"utt-1:{get_frontend(name).frontend_hash()}".encode()).hexdigest()
        assert got == key
        assert int(got[:8], 16) % 64 == shard


def test_n_fft_override_sets_win_length_like_upstream_cli():
    fe = get_frontend("squeezeformer", n_fft=512)
    assert fe.config_dict()["win_length"] == 512
    assert fe.frontend_hash() == "3432c2cdb779"
    assert get_frontend("squeezeformer", n_fft=512, win_length=400).config_dict()["win_length"] == 400
    assert get_frontend("squeezeformer", hop_length=320).config_dict()["hop_length"] == 320
    assert "'preemphasis': 0.95" in get_frontend("squeezeformer", preemphasis=0.95).config_repr()
    assert "'n_mels': 64" in get_frontend("zipformer", n_mels=64).config_repr()
    assert get_frontend("w2v-bert", n_mels=64).feature_dim == 128


def test_unknown_override_lists_valid_keys():
    with pytest.raises(FeatureConfigError) as err:
        get_frontend("squeezeformer", nfft=512)
    assert "'nfft'" in str(err.value) and "n_fft" in str(err.value) and "hop_length" in str(err.value)
    with pytest.raises(FeatureConfigError, match="padding_value"):
        get_frontend("w2v-bert", hop_length=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_fft": 400, "win_length": 512}, "win_length must be <= n_fft"),
        ({"hop_length": 0}, "hop_length must be a positive int"),
        ({"normalize_signal": 1}, "normalize_signal must be True or False"),
        ({"backend": "audioflux"}, "backend must be 'torchaudio'"),
    ],
)
def test_invalid_overrides_raise(overrides, message):
    with pytest.raises(FeatureConfigError, match=message):
        get_frontend("squeezeformer", **overrides)


@pytest.mark.parametrize(
    "value, text",
    [
        (0.97, "0.97"), (0.0, "0.0"), (1.0, "1.0"), (0.1, "0.1"), (0.95, "0.95"), (-0.5, "-0.5"),
        (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (0.0001, "0.0001"), (0.00001, "1e-5"),
        (1e16, "1e16"), (123456789.0, "123456790.0"), (16000, "16000.0"), (1 / 3, "0.33333334"),
    ],
)
def test_py_float_matches_rust_f32_debug(value, text):
    assert py_float(value) == text


# ------------------------------------------------------------------------------- pinned vectors


@pytest.mark.parametrize("name", ["squeezeformer", "zipformer", "w2v-bert"])
def test_derived_vectors_spec_section_5(name):
    shape, row0, rowlast = DERIVED[name]
    y = get_frontend(name)(derived_input(), 16000)
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_allclose(y[0, :4], row0, atol=1e-4)
    np.testing.assert_allclose(y[-1, -4:], rowlast, atol=1e-4)
    ref = json.loads(SPEC_VECTORS.read_text())[name.replace("-", "_")]
    assert list(y.shape) == ref["shape"]
    np.testing.assert_allclose(y[0, :4], ref["row0_first4"], atol=1e-4)
    np.testing.assert_allclose(y[-1, -4:], ref["rowlast_last4"], atol=1e-4)
    np.testing.assert_allclose([y.max(), y.min()], [ref["max"], ref["min"]], atol=1e-4)
    assert abs(float(y.mean(dtype=np.float64)) - ref["mean"]) < 1e-4


def test_zipformer_floor_is_ln_1e5():
    y = get_frontend("zipformer")(derived_input(), 16000)
    assert y.min() == pytest.approx(np.log(1e-5), abs=1e-6)
    assert y.mean(dtype=np.float64) == pytest.approx(-9.550793, abs=1e-4)


# ------------------------------------------------------------------------------- frame counts

FRAMES_BY_LEN = [(1, 3, 0), (159, 3, 0), (160, 3, 0), (320, 3, 0), (399, 3, 0), (400, 3, 1), (401, 3, 1),
                 (560, 4, 1), (800, 6, 2), (16000, 101, 49), (32000, 201, 99)]


@pytest.mark.parametrize("n, audio_rows, w2v_rows", FRAMES_BY_LEN)
def test_frame_counts_by_length(n, audio_rows, w2v_rows):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    for name in ("squeezeformer", "zipformer"):
        fe = get_frontend(name)
        assert fe.num_frames(n) == audio_rows
        assert fe.batch([x])[0].shape == (audio_rows, 80)
    w2v = get_frontend("w2v-bert")
    assert w2v.num_frames(n) == w2v_rows
    assert w2v.batch([x])[0].shape == (w2v_rows, 160)


@pytest.mark.parametrize("n", [1, 159, 160, 399, 400, 16000, 32000])
def test_estimate_equals_exact_for_audio_frontends(n):
    fe = get_frontend("squeezeformer")
    assert fe.estimate_num_frames(n, 16000) == fe.num_frames(n)


def test_estimates_from_upstream_tests():
    sq = get_frontend("squeezeformer")
    assert sq.estimate_num_frames(3200, 16000) == 21
    assert sq.estimate_num_frames(145920, 48000) == 305
    assert sq.estimate_num_frames(16000, 16000) == 101
    assert sq.estimate_num_frames(0, 16000) == 0
    w2v = get_frontend("w2v-bert")
    assert w2v.estimate_num_frames(16000, 16000) == 50  # approximation; exact is 49
    assert w2v.num_frames(16000) == 49
    assert w2v.estimate_num_frames(1, 16000) == 1
    assert w2v.estimate_num_frames(48000, 48000) == 50


def test_rust_time_by_mel_vector():
    x = np.zeros(320, dtype=np.float32)
    x[10] = 0.5
    y = get_frontend("squeezeformer")(x, 16000)
    assert y.shape == (3, 80) and np.isfinite(y).all()


# ------------------------------------------------------------------------------- edge cases


def test_w2v_bert_short_input():
    w2v = get_frontend("w2v-bert")
    assert w2v.min_num_samples == 400
    assert w2v.batch([np.zeros(399, np.float32)])[0].shape == (0, 160)
    with pytest.raises(FeatureConfigError, match="needs at least 400 samples"):
        w2v(np.zeros(399, np.float32), 16000)
    with pytest.raises(FeatureConfigError, match="needs at least 400 samples"):
        w2v(np.zeros(1190, np.float32), 48000)  # 397 samples after resampling


def test_w2v_bert_single_frame_is_zeros_not_nan():
    x = np.random.default_rng(0).standard_normal(450).astype(np.float32) * 0.1
    y = get_frontend("w2v-bert")(x, 16000)
    assert y.shape == (1, 160)
    np.testing.assert_array_equal(y[0, :80], 0.0)  # one frame: variance 0 -> 0 (HF gives NaN)
    np.testing.assert_array_equal(y[0, 80:], 1.0)  # padding frame holds padding_value
    assert get_frontend("w2v-bert", padding_value=-2.0)(x, 16000)[0, 80] == -2.0


def test_empty_input_raises_for_logmel():
    with pytest.raises(FeatureConfigError, match="at least 1 samples"):
        get_frontend("squeezeformer")(np.zeros(0, np.float32), 16000)


def test_digital_silence_is_finite():
    for name in ("squeezeformer", "zipformer", "w2v-bert"):
        y = get_frontend(name)(np.zeros(4000, np.float32), 16000)
        assert np.isfinite(y).all()
    np.testing.assert_array_equal(get_frontend("squeezeformer")(np.zeros(4000, np.float32), 16000), 0.0)
    np.testing.assert_array_equal(get_frontend("w2v-bert")(np.zeros(4000, np.float32), 16000)[:, :80], 0.0)


def test_constant_column_rule():
    rng = np.random.default_rng(0)
    feats = np.empty((300, 3), dtype=np.float32)
    feats[:, 0] = np.float32(np.log(1e-5))  # exactly constant (floored band)
    feats[:, 1] = rng.standard_normal(300)
    feats[:, 2] = np.float32(-11.5) + rng.choice([0, 1], 300).astype(np.float32) * np.spacing(np.float32(11.5))
    out = normalize_columns(feats.copy(), ddof=0, std_floor=1e-5)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_array_equal(out[:, 2], 0.0)  # 1-ulp rounding noise is not amplified
    assert out[:, 1].std() == pytest.approx(1.0, abs=1e-5)
    # a small but real variation (1e-3, far above rounding) is standardized as torch does
    feats[:, 2] = -11.5 + 1e-3 * rng.standard_normal(300)
    assert normalize_columns(feats.copy(), ddof=0, std_floor=1e-5)[:, 2].std() == pytest.approx(1.0, abs=1e-3)


def test_band_limited_audio_gives_zero_columns():
    """8 kHz material upsampled to 16 kHz: bands above 4 kHz sit at the floor -> exactly 0."""
    rng = np.random.default_rng(1)
    burst = 0.3 * rng.standard_normal(12000) * np.hanning(12000)  # faded in/out, 1.5 s at 8 kHz
    x8k = np.concatenate([np.zeros(2000), burst, np.zeros(2000)]).astype(np.float32)
    y = get_frontend("squeezeformer")(x8k, 8000)
    assert y.shape == (201, 80)
    top = y[:, 70:]
    np.testing.assert_array_equal(top, 0.0)
    assert np.abs(y[:, :40]).max() > 0.5  # the pass band is standardized normally


def test_lazy_padded_signal_matches_whole_array_reference():
    """``_Signal.fill`` (block-wise, reflect edges) equals the whole-array ``_prepare_signal``
    up to the peak scale, which ``_Signal`` applies in the log domain."""
    from asr_assets.frontends import logmel

    rng = np.random.default_rng(5)
    configs = [logmel.SQUEEZEFORMER_CONFIG, logmel.ZIPFORMER_CONFIG,
               logmel.make_logmel_config(logmel.SQUEEZEFORMER_CONFIG, {"n_fft": 512, "win_length": 300})]
    for cfg in configs:
        for n in (1, 2, 199, 200, 201, 399, 400, 401, 1234):
            x = (0.1 * rng.standard_normal(n) + 0.05).astype(np.float32)
            ref = logmel._prepare_signal(x, cfg)
            sig = logmel._Signal(x, cfg)
            scratch = np.empty(ref.shape[0], np.float32)
            s = sig.scale  # the peak scale is applied in the log domain, not to the samples
            np.testing.assert_allclose(sig.fill(0, ref.shape[0], scratch) * s, ref, atol=1e-6)
            for a, b in rng.integers(0, ref.shape[0] + 1, size=(20, 2)):
                a, b = sorted((int(a), int(b)))
                np.testing.assert_allclose(sig.fill(a, b, scratch) * s, ref[a:b], atol=1e-6)


# ------------------------------------------------------------------------------- call / batch


def test_signal_normalization_without_feature_normalization():
    """normalize_signal alone: the peak scale folded into the log floor gives upstream's values."""
    with np.load(REPO / "asr_assets_tests" / "data" / "ref_arctic_a0007.npz") as npz:
        x = npz["samples"][:24000] * np.float32(0.01) + np.float32(0.003)  # quiet, DC offset
    fe = get_frontend("squeezeformer", normalize_feature=False)
    ref = get_frontend("zipformer", preemphasis=0.97).batch([_normalized_reference(x)])[0]
    diff = np.abs(fe(x, 16000) - ref)  # float32 rounding only (largest in near-floor bins)
    assert np.percentile(diff, 99.9) < 5e-4 and diff.max() < 2e-3
    assert fe(np.zeros(800, np.float32), 16000).min() == pytest.approx(np.log(1e-5), abs=1e-5)


def _normalized_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.mean(dtype=np.float64)
    return (x / np.abs(x).max()).astype(np.float32)


def test_call_resamples_and_downmixes():
    from asr_assets.audio import resample

    rng = np.random.default_rng(2)
    x48 = (0.2 * rng.standard_normal(48000)).astype(np.float32)
    fe = get_frontend("squeezeformer")
    expected = fe.batch([resample(x48, 48000, 16000)])[0]
    np.testing.assert_array_equal(fe(x48, 48000), expected)
    stereo = np.stack([x48, 0.5 * x48])
    np.testing.assert_allclose(fe(stereo, 48000), fe(0.75 * x48, 48000), atol=1e-4)
    np.testing.assert_array_equal(compute_features(x48, 48000), expected)
    np.testing.assert_array_equal(compute_features(x48, 48000, fe), expected)
    assert compute_features(x48, 48000, "squeezeformer", n_fft=512).shape == expected.shape


def test_call_rejects_bad_input():
    fe = get_frontend("zipformer")
    with pytest.raises(TypeError, match="floating-point"):
        fe(np.zeros(800, dtype=np.int16), 16000)
    with pytest.raises(FeatureConfigError, match="shape"):
        fe(np.zeros((1, 2, 800), np.float32), 16000)
    with pytest.raises(FeatureConfigError, match="sample_rate"):
        fe(np.zeros(800, np.float32), 0)
    with pytest.raises(FeatureConfigError, match="only be given with a frontend name"):
        compute_features(np.zeros(800, np.float32), 16000, fe, n_fft=512)


@pytest.mark.parametrize("name", ["squeezeformer", "zipformer", "w2v-bert"])
def test_batch_equals_one_by_one(name, monkeypatch):
    """Frames packed across utterances and split across blocks give the per-utterance result."""
    from asr_assets.frontends import base

    rng = np.random.default_rng(3)
    utts = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 401, 5000, 32000, 777)]
    fe = get_frontend(name)
    singles = [fe.batch([u])[0] for u in utts]
    monkeypatch.setattr(base, "CHUNK_FRAMES", 37)
    for mod in ("logmel", "w2v_bert"):
        monkeypatch.setattr(f"asr_assets.frontends.{mod}.CHUNK_FRAMES", 37)
    batched = fe.batch(utts)
    for a, b in zip(singles, batched, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["squeezeformer", "zipformer", "w2v-bert"])
def test_non_contiguous_and_float64_input(name):
    x = (0.1 * np.random.default_rng(4).standard_normal(200000)).astype(np.float64)  # > 2 blocks
    fe = get_frontend(name)
    expected = fe.batch([np.ascontiguousarray(x[::2], dtype=np.float32)])[0]
    x32 = x.astype(np.float32)
    for strided in (x[::2], x32[::2]):  # float64 strided, float32 strided (no copy by asarray)
        np.testing.assert_array_equal(fe.batch([strided])[0], expected)
        np.testing.assert_array_equal(fe(strided, 16000), expected)


def test_frontends_pickle_small_and_equal():
    for name in ("squeezeformer", "zipformer", "w2v-bert", "ludwig-fbank"):
        fe = get_frontend(name)
        fe(np.zeros(1600, np.float32), 16000)  # tables built: must not bloat the pickle
        blob = pickle.dumps(fe)
        assert len(blob) < 2000
        clone = pickle.loads(blob)
        assert isinstance(clone, Frontend)
        assert clone == fe and clone.frontend_hash() == fe.frontend_hash()
        x = derived_input()
        np.testing.assert_array_equal(clone(x, 16000), fe(x, 16000))


def test_package_imports_without_dagster_or_heavy_deps():
    code = (
        "import sys, asr_assets.frontends as f; f.get_frontend('w2v-bert'); "
        "bad = [m for m in ('dagster', 'torch', 'librosa', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
