"""Ludwig audio feature frontends (``ludwig-fbank``, ``-stft``, ``-stft_phase``,
``-group_delay``, ``-raw``) against a literal frame-by-frame restatement of Ludwig's
``audio_utils.py`` / ``AudioFeatureMixin._transform_to_feature``, plus shapes and cache keys.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter
from scipy.signal.windows import get_window

from asr_assets.errors import FeatureConfigError
from asr_assets.frontends import get_frontend

DATA = Path(__file__).resolve().parent / "data"


def speech(seconds: float = 1.5) -> np.ndarray:
    with np.load(DATA / "ref_arctic_a0007.npz") as npz:
        return npz["samples"][: int(seconds * 16000)]


def ludwig_reference(x, sr, kind, win_s=0.04, hop_s=0.02, nfft=None, window_type="hamming",
                     bands=80, limit_s=7.5, padding_value=0.0, norm=None):
    """Frame-by-frame restatement of Ludwig's audio feature pipeline (float64)."""
    limit = int(limit_s * sr)
    if kind == "raw":
        feat = x.astype(np.float64)[:, None]
        max_len = limit
    else:
        wl, ws = int(sr * win_s), int(sr * hop_s)
        nfft = nfft or wl
        y = lfilter([1.0, -0.97], 1.0, x.astype(np.float64))
        count = int(math.ceil((len(y) - wl) / float(ws) + 1))
        frames = np.zeros((max(count, 0), wl))
        for i in range(max(count, 0)):
            start = ws * i
            end = start + wl if i < count - 1 else len(y)
            chunk = y[start:end]
            if kind == "fbank":
                chunk = chunk - chunk.mean()
            frames[i, : len(chunk)] = chunk
        window = get_window(window_type, wl, fftbins=False)
        keep = nfft // 2 + 1
        spec = np.fft.fft(frames * window, n=nfft)[:, :keep]
        if kind == "stft":
            feat = np.abs(spec)
        elif kind == "stft_phase":
            feat = np.concatenate([np.angle(spec), np.abs(spec)], axis=1)
        elif kind == "group_delay":
            spec_y = np.fft.fft(frames * (window * np.arange(wl)), n=nfft)[:, :keep]
            feat = (spec.real * spec_y.real + spec.imag * spec_y.imag) / (np.abs(spec) ** 2 + 1e-10)
        else:
            mel = lambda hz: 2595.0 * np.log10(1 + hz / 700.0)  # noqa: E731
            points = np.linspace(0, mel(int(sr / 2)), bands + 2)
            edges = np.floor((nfft + 1) / sr * (700.0 * (10 ** (points / 2595.0) - 1)))
            fb = np.zeros((bands, keep), dtype=np.float32)
            for m in range(bands):
                lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
                for k in range(int(lo), int(mid)):
                    fb[m, k] = (k - lo) / (mid - lo)
                for k in range(int(mid), int(hi)):
                    fb[m, k] = (hi - k) / (hi - mid)
            feat = np.log(np.abs(spec) ** 2 @ fb.T + 1e-10)
        max_len = int(math.ceil((limit - wl) / float(ws) + 1))
    if norm == "per_file":
        feat = (feat - feat.mean(0)) / (feat.std(0, ddof=1) + 1e-10)
    out = np.full((max_len, feat.shape[1]), padding_value)
    rows = min(max_len, feat.shape[0])
    out[:rows] = feat[:rows]
    return out


CASES = [
    ("fbank", {}),
    ("fbank", {"window_type": "hann", "num_fft_points": 1024, "num_filter_bands": 40, "norm": "per_file"}),
    ("stft", {"window_type": "blackman", "audio_file_length_limit_in_s": 1.0}),
    ("stft_phase", {"window_type": "bartlett", "padding_value": -1.0, "audio_file_length_limit_in_s": 2.0}),
    ("group_delay", {"window_length_in_s": 0.025, "window_shift_in_s": 0.01, "num_fft_points": 512,
                     "audio_file_length_limit_in_s": 2.0}),
    ("raw", {"audio_file_length_limit_in_s": 2.0, "norm": "per_file"}),
]
RENAME = {"window_length_in_s": "win_s", "window_shift_in_s": "hop_s", "num_fft_points": "nfft",
          "num_filter_bands": "bands", "audio_file_length_limit_in_s": "limit_s"}


@pytest.mark.parametrize("kind, overrides", CASES)
def test_matches_ludwig_restatement(kind, overrides):
    x = speech()
    fe = get_frontend(f"ludwig-{kind}", **overrides)
    ours = fe(x, 16000)
    ref = ludwig_reference(x, 16000, kind, **{RENAME.get(k, k): v for k, v in overrides.items()})
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (fe.num_frames(len(x)), fe.feature_dim)
    rows = fe.num_valid_frames(len(x))
    assert 0 < rows <= ours.shape[0]
    assert np.all(ours[rows:] == overrides.get("padding_value", 0.0))
    if kind == "stft_phase":  # phase is ill-defined where the magnitude is ~0: compare e^{j phase}
        half = fe.feature_dim // 2
        mag = ref[:rows, half:]
        ok = mag > 1e-6 * mag.max()
        dphase = np.angle(np.exp(1j * (ours[:rows, :half] - ref[:rows, :half])))
        assert np.abs(dphase[ok]).max() < 1e-3
        np.testing.assert_allclose(ours[:rows, half:], mag, rtol=1e-4, atol=1e-6 * mag.max())
    elif kind == "group_delay":  # ill-conditioned where |X| ~ 0: compare where |X| is not tiny
        spec_ok = get_frontend("ludwig-stft", **overrides)(x, 16000)[:rows]
        ok = spec_ok > 1e-4 * spec_ok.max()
        np.testing.assert_allclose(ours[:rows][ok], ref[:rows][ok], rtol=1e-3, atol=1e-2)
    else:
        scale = np.abs(ref[:rows]).max()
        np.testing.assert_allclose(ours[:rows], ref[:rows], rtol=1e-4, atol=1e-5 * scale)


def test_shapes_and_units_documented_defaults():
    x = speech(1.0)
    assert get_frontend("ludwig-fbank")(x, 16000).shape == (374, 80)  # ceil((120000-640)/320+1)
    assert get_frontend("ludwig-stft")(x, 16000).shape == (374, 321)
    assert get_frontend("ludwig-stft_phase")(x, 16000).shape == (374, 642)
    assert get_frontend("ludwig-group_delay")(x, 16000).shape == (374, 321)
    assert get_frontend("ludwig-raw")(x, 16000).shape == (120000, 1)
    phase = get_frontend("ludwig-stft_phase")(x, 16000)[:40, :321]
    assert phase.min() >= -np.pi - 1e-6 and phase.max() <= np.pi + 1e-6


def test_config_drives_hash():
    fe = get_frontend("ludwig-fbank")
    expected = (
        "{'featurizer': {'type': 'ludwig_audio', 'feature_type': 'fbank', 'sample_rate': 16000, "
        "'audio_file_length_limit_in_s': 7.5, 'window_length_in_s': 0.04, 'window_shift_in_s': 0.02, "
        "'num_fft_points': 640, 'window_type': 'hamming', 'num_filter_bands': 80, "
        "'padding_value': 0.0, 'norm': None}}"
    )
    assert fe.config_repr() == expected
    assert fe.frontend_hash() == hashlib.sha256(expected.encode()).hexdigest()[:12]
    # the default FFT size resolves to the window length, so spelling it out keys identically
    assert get_frontend("ludwig-fbank", num_fft_points=640).frontend_hash() == fe.frontend_hash()
    kinds = ("fbank", "stft", "stft_phase", "group_delay", "raw")
    hashes = {get_frontend(f"ludwig-{t}").frontend_hash() for t in kinds}
    assert len(hashes) == 5
    assert get_frontend("ludwig-fbank", norm="per_file").frontend_hash() != fe.frontend_hash()
    assert "window_type" not in get_frontend("ludwig-raw").config_dict()


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("ludwig-fbank", {"num_fft_points": 320}, "num_fft_points"),
        ("ludwig-fbank", {"window_type": "kaiser"}, "window_type"),
        ("ludwig-fbank", {"norm": "global"}, "norm"),
        ("ludwig-fbank", {"audio_file_length_limit_in_s": 1.00001}, "integer number of samples"),
        ("ludwig-raw", {"window_type": "hann"}, "valid keys"),
    ],
)
def test_invalid_ludwig_config(name, overrides, message):
    with pytest.raises(FeatureConfigError, match=message):
        get_frontend(name, **overrides)


def test_short_and_empty_input_are_all_padding():
    fe = get_frontend("ludwig-fbank", padding_value=-5.0, audio_file_length_limit_in_s=1.0)
    for n in (0, 100):
        y = fe(np.zeros(n, np.float32), 16000)
        assert y.shape == (49, 80) and np.all(y == -5.0)
