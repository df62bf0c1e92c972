"""Ludwig audio feature types as frontends: ``fbank``, ``stft``, ``stft_phase``, ``group_delay``,
``raw``.

Public entry points:
    * :class:`LudwigConfig` - the keyed config (Ludwig ``AudioPreprocessingConfig`` fields).
    * :class:`LudwigFrontend` - the frontend, registered as ``ludwig-<type>``.
    * :data:`FACTORIES` - registry name -> factory taking overrides.

The algorithms restate Ludwig ``ludwig/utils/audio_utils.py`` and
``ludwig/features/audio_feature.py`` (``AudioFeatureMixin._transform_to_feature``):

1. Pre-emphasis ``y[n] = x[n] - 0.97 * x[n-1]`` (``scipy.signal.lfilter([1, -0.97], 1, x)``),
   for every type except ``raw``.
2. Framing: window ``W = int(sr * window_length_in_s)`` samples, shift
   ``S = int(sr * window_shift_in_s)``, ``ceil((n - W) / S + 1)`` frames (0 if that is <= 0);
   the last frame holds the remaining samples and is zero-padded. ``fbank`` subtracts each
   frame's mean (over its real samples) first.
3. Symmetric window (``scipy.signal.get_window(type, W, fftbins=False)``: hamming, hann,
   blackman or bartlett), FFT of ``num_fft_points`` (default ``W``), first
   ``num_fft_points // 2 + 1`` bins.
4. Per type, output ``float32 (max_length, feature_dim)``:

   * ``stft``: magnitude ``|X[k]|`` (input amplitude units), ``feature_dim = nfft//2 + 1``.
   * ``stft_phase``: ``[angle(X) in radians (-pi, pi] | |X|]``, ``feature_dim = 2 (nfft//2 + 1)``.
   * ``group_delay``: ``tau[k] = (Re X Re Y + Im X Im Y) / (|X|^2 + 1e-10)`` in **samples**, where
     ``Y`` is the FFT of the frame weighted by ``n * w[n]``: the group delay
     ``-d(phase)/d(omega) = Re(Y conj(X)) / |X|^2`` (Yegnanarayana & Murthy, "Significance of
     group delay functions in spectrum estimation", IEEE Trans. Signal Processing 40(9), 1992;
     Ludwig ``get_group_delay``). ``feature_dim = nfft//2 + 1``.
   * ``fbank``: ``ln(|X|^2 @ M + 1e-10)`` with Ludwig's python_speech_features-style mel
     matrix ``M`` (HTK mel 0..sr/2, triangles on FFT bin indices
     ``floor((nfft + 1) * mel_to_hz(points) / sr)``), ``feature_dim = num_filter_bands``.
   * ``raw``: the samples themselves, ``feature_dim = 1``, rows = samples.

5. ``norm="per_file"``: ``(x - mean) / (std_unbiased + 1e-10)`` per column over the whole file
   (a constant column gives 0, see :func:`~.base.normalize_columns`; Ludwig would amplify
   rounding noise by 1e10, and gives NaN for a single frame where this gives 0).
6. Truncate or pad with ``padding_value`` to ``max_length`` rows, where ``max_length`` is
   ``L = audio_file_length_limit_in_s * sr`` samples for ``raw`` and ``ceil((L - W) / S + 1)``
   frames otherwise. The output shape is therefore fixed, as in Ludwig.

Differences from Ludwig: audio is first resampled to ``sample_rate`` (keyed; Ludwig uses each
file's rate); ``stft_phase``/``stft``/``group_delay`` widths follow ``num_fft_points`` (Ludwig
derives them from the window length and fails when they differ); computation is float64,
output float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from asr_assets.errors import FeatureConfigError

from .base import Frontend, check_float, check_positive_int, normalize_columns

FEATURE_TYPES = ("fbank", "stft", "stft_phase", "group_delay", "raw")
WINDOW_TYPES = ("hamming", "hann", "blackman", "bartlett")
PREEMPHASIS = 0.97
LOG_OFFSET = 1e-10


@dataclasses.dataclass(frozen=True)
class LudwigConfig:
    """Keyed settings of a Ludwig audio feature (Ludwig ``AudioPreprocessingConfig``).

    Attributes:
        type: always ``"ludwig_audio"``.
        feature_type: one of ``fbank, stft, stft_phase, group_delay, raw``.
        sample_rate: working rate in Hz (input is resampled). (Default: 16000)
        audio_file_length_limit_in_s: output covers this many seconds; longer input is cut,
            shorter padded. ``limit * sample_rate`` must be an integer. (Default: 7.5)
        window_length_in_s: STFT window length in seconds. (Default: 0.04)
        window_shift_in_s: STFT hop in seconds. (Default: 0.02)
        num_fft_points: FFT size, ``>= window length in samples``; ``None`` means the window
            length and is resolved to it. (Default: window length)
        window_type: ``hamming``, ``hann``, ``blackman`` or ``bartlett`` (symmetric).
            (Default: hamming)
        num_filter_bands: mel bands of ``fbank``. (Default: 80)
        padding_value: value of padded rows. (Default: 0.0)
        norm: ``None`` or ``"per_file"``. (Default: None)
    """

    type: str = "ludwig_audio"
    feature_type: str = "fbank"
    sample_rate: int = 16000
    audio_file_length_limit_in_s: float = 7.5
    window_length_in_s: float = 0.04
    window_shift_in_s: float = 0.02
    num_fft_points: Optional[int] = None
    window_type: str = "hamming"
    num_filter_bands: int = 80
    padding_value: float = 0.0
    norm: Optional[str] = None

    def __post_init__(self) -> None:
        if self.type != "ludwig_audio":
            raise FeatureConfigError(f"type must be 'ludwig_audio', got {self.type!r}")
        if self.feature_type not in FEATURE_TYPES:
            raise FeatureConfigError(f"feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.window_type not in WINDOW_TYPES:
            raise FeatureConfigError(f"window_type must be one of {WINDOW_TYPES}, got {self.window_type!r}")
        if self.norm not in (None, "per_file"):
            raise FeatureConfigError(f"norm must be None or 'per_file', got {self.norm!r}")
        sr = check_positive_int("sample_rate", self.sample_rate)
        object.__setattr__(self, "sample_rate", sr)
        limit = check_float("audio_file_length_limit_in_s", self.audio_file_length_limit_in_s, low=0.0)
        object.__setattr__(self, "audio_file_length_limit_in_s", limit)
        if not float(limit * sr).is_integer():
            raise FeatureConfigError(
                f"audio_file_length_limit_in_s * sample_rate must be an integer number of samples, "
                f"got {limit!r} * {sr} = {limit * sr!r}"
            )
        for name in ("window_length_in_s", "window_shift_in_s"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), low=0.0))
        object.__setattr__(self, "padding_value", check_float("padding_value", self.padding_value))
        object.__setattr__(self, "num_filter_bands", check_positive_int("num_filter_bands", self.num_filter_bands))
        if self.feature_type != "raw":
            if self.window_samples < 1 or self.shift_samples < 1:
                raise FeatureConfigError(
                    f"window_length_in_s and window_shift_in_s must each give >= 1 sample at {sr} Hz, "
                    f"got {self.window_samples} and {self.shift_samples}"
                )
            nfft = self.window_samples if self.num_fft_points is None else self.num_fft_points
            nfft = check_positive_int("num_fft_points", nfft)
            if nfft < self.window_samples:
                raise FeatureConfigError(
                    f"num_fft_points ({nfft}) must be >= the window length in samples "
                    f"({self.window_samples} = {self.window_length_in_s} s * {sr} Hz)"
                )
            object.__setattr__(self, "num_fft_points", nfft)

    @property
    def window_samples(self) -> int:
        """Window length in samples, ``int(sample_rate * window_length_in_s)`` (Ludwig)."""
        return int(self.sample_rate * self.window_length_in_s)

    @property
    def shift_samples(self) -> int:
        """Hop in samples, ``int(sample_rate * window_shift_in_s)`` (Ludwig)."""
        return int(self.sample_rate * self.window_shift_in_s)

    def to_dict(self) -> dict[str, Any]:
        """Keyed dict; ``raw`` omits the STFT settings it does not use."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.feature_type == "raw":
            for key in ("window_length_in_s", "window_shift_in_s", "num_fft_points", "window_type", "num_filter_bands"):
                d.pop(key)
        elif self.feature_type != "fbank":
            d.pop("num_filter_bands")
        return d


def num_stft_frames(num_samples: int, window: int, shift: int) -> int:
    """Ludwig ``get_num_output_padded_to_fit_input``: ``ceil((n - W) / S + 1)``, at least 0."""
    return max(0, int(math.ceil((num_samples - window) / float(shift) + 1)))


@functools.lru_cache(maxsize=16)
def _window(window_type: str, length: int, group_delay: bool) -> np.ndarray:
    from scipy.signal.windows import get_window  # scipy.signal costs ~0.5 s to import: only when computing

    w = get_window(window_type, length, fftbins=False).astype(np.float64)
    if group_delay:
        w = w * np.arange(length)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=16)
def ludwig_mel_matrix(num_filter_bands: int, num_fft_points: int, sample_rate: int) -> np.ndarray:
    """Ludwig ``_get_mel_fbank_matrix`` (python_speech_features style), transposed.

    Returns:
        ``float32 (num_fft_points // 2 + 1, num_filter_bands)`` triangle weights in [0, 1].
    """
    bins = num_fft_points // 2 + 1
    mel_max = 2595.0 * np.log10(1 + int(sample_rate / 2) / 700.0)
    points = np.linspace(0.0, mel_max, num_filter_bands + 2)
    hz = 700.0 * (10 ** (points / 2595.0) - 1)
    edges = np.floor((num_fft_points + 1) / sample_rate * hz)
    fb = np.zeros((num_filter_bands, bins), dtype=np.float32)
    k = np.arange(bins)
    for m in range(num_filter_bands):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (k >= int(lo)) & (k < int(mid))
        falling = (k >= int(mid)) & (k < int(hi))
        if mid > lo:
            fb[m, rising] = (k[rising] - lo) / (mid - lo)
        if hi > mid:
            fb[m, falling] = (hi - k[falling]) / (hi - mid)
    out = np.ascontiguousarray(fb.T)
    out.setflags(write=False)
    return out


def _frames(x: np.ndarray, window: int, shift: int, zero_mean: bool) -> np.ndarray:
    """Ludwig ``_preprocess_to_padded_matrix``: float64 (num_frames, window), last frame padded."""
    n = x.shape[0]
    count = num_stft_frames(n, window, shift)
    out = np.zeros((count, window), dtype=np.float64)
    if count == 0:
        return out
    if count > 1:
        full = np.lib.stride_tricks.sliding_window_view(x, window)[::shift][: count - 1]
        out[: count - 1] = full
        if zero_mean:
            out[: count - 1] -= full.mean(axis=1, keepdims=True)
    start = shift * (count - 1)
    tail = x[start:n]
    out[count - 1, : tail.shape[0]] = tail - (tail.mean() if zero_mean and tail.size else 0.0)
    return out


def ludwig_features(x: np.ndarray, cfg: LudwigConfig) -> np.ndarray:
    """Ludwig audio feature of one utterance before normalization and padding.

    Args:
        x: ``float (num_samples,)`` mono at ``cfg.sample_rate`` Hz, in [-1, 1].
        cfg: settings.

    Returns:
        ``float64 (num_frames, feature_dim)`` (see the module docstring for units).
    """
    x = np.asarray(x, dtype=np.float64)
    if cfg.feature_type == "raw":
        return x[:, None].copy()
    y = x.copy()
    if y.size > 1:
        y[1:] -= PREEMPHASIS * x[:-1]
    wl, ws, nfft = cfg.window_samples, cfg.shift_samples, int(cfg.num_fft_points)  # type: ignore[arg-type]
    bins = nfft // 2 + 1
    frames = _frames(y, wl, ws, zero_mean=cfg.feature_type == "fbank")
    import scipy.fft  # imported on first use (~0.3 s), not by `asr-assets frontends`

    spec = scipy.fft.rfft(frames * _window(cfg.window_type, wl, False), n=nfft, axis=1)[:, :bins]
    if cfg.feature_type == "stft":
        return np.abs(spec)
    if cfg.feature_type == "stft_phase":
        return np.concatenate([np.angle(spec), np.abs(spec)], axis=1)
    if cfg.feature_type == "group_delay":
        spec_y = scipy.fft.rfft(frames * _window(cfg.window_type, wl, True), n=nfft, axis=1)[:, :bins]
        num = spec.real * spec_y.real + spec.imag * spec_y.imag
        return num / (np.abs(spec) ** 2 + LOG_OFFSET)
    power = spec.real**2 + spec.imag**2
    return np.log(power @ ludwig_mel_matrix(cfg.num_filter_bands, nfft, cfg.sample_rate) + LOG_OFFSET)


class LudwigFrontend(Frontend):
    """A Ludwig audio feature type (see the module docstring for the algorithm and units).

    Output: ``float32 (max_length, feature_dim)``, fixed for a given config (input longer than
    ``audio_file_length_limit_in_s`` is cut, shorter input padded with ``padding_value``).

    Args:
        config: keyed settings.
    """

    def __init__(self, config: LudwigConfig):
        self.config = config
        self.name = f"ludwig-{config.feature_type}"
        self.sample_rate = config.sample_rate
        self.min_num_samples = 0
        bins = (int(config.num_fft_points) // 2 + 1) if config.feature_type != "raw" else 0  # type: ignore[arg-type]
        self.feature_dim = {
            "raw": 1,
            "fbank": config.num_filter_bands,
            "stft": bins,
            "group_delay": bins,
            "stft_phase": 2 * bins,
        }[config.feature_type]
        limit = int(config.audio_file_length_limit_in_s * config.sample_rate)
        self.max_length = (
            limit
            if config.feature_type == "raw"
            else num_stft_frames(limit, config.window_samples, config.shift_samples)
        )

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def num_frames(self, num_samples_16k: int) -> int:
        """Always ``max_length``: Ludwig pads or cuts every file to the same length."""
        return self.max_length

    def num_valid_frames(self, num_samples: int) -> int:
        """Rows that hold real data (the rest is ``padding_value``)."""
        if self.config.feature_type == "raw":
            return min(int(num_samples), self.max_length)
        cfg = self.config
        return min(num_stft_frames(int(num_samples), cfg.window_samples, cfg.shift_samples), self.max_length)

    def batch(self, samples_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for x in samples_16k:
            feat = ludwig_features(x, self.config).astype(np.float32)
            if self.config.norm == "per_file" and feat.shape[0]:
                normalize_columns(feat, ddof=1, std_offset=LOG_OFFSET)
            out = np.full((self.max_length, self.feature_dim), self.config.padding_value, dtype=np.float32)
            rows = min(feat.shape[0], self.max_length)
            out[:rows] = feat[:rows]
            outs.append(out)
        return outs


def _factory(feature_type: str) -> Callable[..., LudwigFrontend]:
    valid = [f.name for f in dataclasses.fields(LudwigConfig) if f.name not in ("type", "feature_type")]
    if feature_type == "raw":
        valid = [k for k in valid if k in ("sample_rate", "audio_file_length_limit_in_s", "padding_value", "norm")]

    def make(**overrides: Any) -> LudwigFrontend:
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise FeatureConfigError(
                f"unknown override(s) {unknown!r} for frontend 'ludwig-{feature_type}'; valid keys: {valid}"
            )
        return LudwigFrontend(LudwigConfig(feature_type=feature_type, **overrides))

    return make


#: Registry entries ``ludwig-<type>`` -> factory(**overrides).
FACTORIES: dict[str, Callable[..., LudwigFrontend]] = {f"ludwig-{t}": _factory(t) for t in FEATURE_TYPES}
