"""HTK log-mel frontends ``squeezeformer`` and ``zipformer`` (spec sections 4.2, 4.3).

Public entry points:
    * :class:`LogMelConfig` - the keyed config, fields in upstream ``config_dict`` order.
    * :class:`LogMelFrontend` - the frontend (registered as ``squeezeformer`` and ``zipformer``).
    * :func:`compute_logmel` - pure function, one utterance.
    * :func:`htk_mel_filterbank` - torchaudio ``melscale_fbanks(norm=None, mel_scale="htk")``.

The algorithm restates upstream ``AudioFeaturizer.forward`` (squeezeformer_pytorch
``frontend.py``), which wraps torchaudio ``MelSpectrogram`` with its defaults: centred STFT with
reflect padding, periodic Hann window, power 2, HTK mel scale, no filter normalization; then
``log(max(mel, 1e-5))`` and optional per-column standardization. Everything runs in float32
with one real FFT (scipy's pocketfft, into a reused buffer) and one banded mel projection
(:class:`~.base.MelBands`) per block of :data:`~.base.CHUNK_FRAMES` frames packed across
utterances. Output is bit-for-bit independent of batching and blocking.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Sequence

import numpy as np

from asr_assets.errors import FeatureConfigError

from .base import (
    _EPS32,
    CHUNK_FRAMES,
    CONSTANT_COLUMN_ULPS,
    Frontend,
    MelBands,
    check_bool,
    check_float,
    check_positive_int,
    effective_num_samples,
    frame_chunks,
    normalize_columns,
    scratch,
)

#: Floor applied to mel power before the natural log (upstream ``clamp_min(1e-5)``).
LOG_FLOOR = 1e-5
#: Lower clamp of the per-column standard deviation (upstream ``clamp_min(1e-5)``).
STD_FLOOR = 1e-5
#: Elements per row group of :func:`_rows_op` (rows of the feature matrix tiled to ~this size).
_TILE_ELEMS = 8192

@functools.lru_cache(maxsize=1)
def _r2c():
    """scipy's pocketfft binding (the function behind ``scipy.fft.rfft``), which accepts
    ``out``; None on other scipy layouts (then the public API, one copy more). Imported on
    first use: scipy.fft costs ~0.3 s to import, which ``asr-assets frontends`` need not pay."""
    try:
        from scipy.fft._pocketfft.pypocketfft import r2c
    except ImportError:  # pragma: no cover
        return None
    return r2c

#: Lower clamp of ``max|x|`` in signal normalization (upstream ``clamp_min(1e-6)``).
PEAK_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
    """Keyed settings of an HTK log-mel frontend (upstream ``AudioFeaturizer``).

    Field order is the upstream ``config_dict`` order and therefore part of the cache key.

    Attributes:
        sample_rate: working rate in Hz. (Default: 16000)
        n_fft: FFT size and frame length in samples. (Default: 400)
        win_length: Hann window length in samples, ``<= n_fft``, centred in the frame.
            (Default: ``n_fft``)
        n_mels: number of HTK mel bands, 0 Hz to ``sample_rate / 2``. (Default: 80)
        backend: always ``"torchaudio"`` (the algorithm reproduced; kept for the key).
        preemphasis: coefficient of ``y[n] = x[n] - c * x[n-1]`` on the whole waveform,
            skipped when 0. (Default: 0.97)
        normalize_signal: remove the mean, then divide by ``max(max|x|, 1e-6)``. (Default: True)
        normalize_feature: standardize each mel column over time (biased std, floor 1e-5).
            (Default: True)
        normalize_per_frame: with ``normalize_feature``, standardize each frame over the mel
            axis instead of each column over time. (Default: False)
        hop_length: frame shift in samples. (Default: 160)
    """

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    n_mels: int = 80
    backend: str = "torchaudio"
    preemphasis: float = 0.97
    normalize_signal: bool = True
    normalize_feature: bool = True
    normalize_per_frame: bool = False
    hop_length: int = 160

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "win_length", "n_mels", "hop_length"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        for name in ("normalize_signal", "normalize_feature", "normalize_per_frame"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        object.__setattr__(
            self, "preemphasis", check_float("preemphasis", self.preemphasis, low=0.0, high=1.0)
        )
        if self.backend != "torchaudio":
            raise FeatureConfigError(
                f"backend must be 'torchaudio' (the algorithm reproduced), got {self.backend!r}"
            )
        if self.win_length > self.n_fft:
            raise FeatureConfigError(
                f"win_length must be <= n_fft, got win_length={self.win_length}, n_fft={self.n_fft}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a dict in upstream key order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: ``AudioFeaturizer()`` defaults (spec 4.2), hash ``0a48384efcf3``.
SQUEEZEFORMER_CONFIG = LogMelConfig()
#: ``zipformer_paper_featurizer_config()`` (spec 4.3), hash ``4d9c4bc8f09a``.
ZIPFORMER_CONFIG = LogMelConfig(
    preemphasis=0.0, normalize_signal=False, normalize_feature=False, normalize_per_frame=False
)


def make_logmel_config(base: LogMelConfig, overrides: dict[str, Any]) -> LogMelConfig:
    """Apply CLI-style overrides to ``base``.

    As upstream ``--n-fft``, overriding ``n_fft`` also sets ``win_length`` unless
    ``win_length`` is given too.

    Raises:
        FeatureConfigError: unknown key or invalid value.
    """
    valid = [f.name for f in dataclasses.fields(LogMelConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise FeatureConfigError(
            f"unknown override(s) {unknown!r} for an HTK log-mel frontend; valid keys: {valid}"
        )
    values = dict(overrides)
    if "n_fft" in values and "win_length" not in values:
        values["win_length"] = values["n_fft"]
    return dataclasses.replace(base, **values)


# --------------------------------------------------------------------------------------------
# Cached DSP tables (module level so frontends stay small to pickle)
# --------------------------------------------------------------------------------------------


def _hz_to_mel_htk(freq: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def htk_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """HTK triangular mel filterbank, torchaudio ``melscale_fbanks`` with ``norm=None``.

    ``n_mels + 2`` points equally spaced on ``2595 * log10(1 + f / 700)`` from 0 Hz to
    ``sample_rate / 2``; triangles are built in Hz against bin frequencies
    ``linspace(0, sample_rate // 2, n_freqs)``.

    Args:
        n_freqs: number of one-sided FFT bins (``n_fft // 2 + 1``).
        n_mels: number of bands.
        sample_rate: rate in Hz.

    Returns:
        ``float64 (n_freqs, n_mels)`` weights in [0, 1].
    """
    all_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)
    m_pts = np.linspace(_hz_to_mel_htk(0.0), _hz_to_mel_htk(sample_rate / 2.0), n_mels + 2)
    f_pts = _mel_to_hz_htk(m_pts)
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


@functools.lru_cache(maxsize=16)
def _tables(n_fft: int, win_length: int, n_mels: int, sample_rate: int) -> tuple[np.ndarray, MelBands]:
    """Return ``(window float32 (n_fft,), MelBands over n_fft//2+1 bins)``."""
    n = np.arange(win_length, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)  # periodic (torch.hann_window)
    window = np.zeros(n_fft, dtype=np.float64)
    left = (n_fft - win_length) // 2
    window[left : left + win_length] = hann
    window = window.astype(np.float32)
    window.setflags(write=False)
    return window, MelBands(htk_mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate))


# --------------------------------------------------------------------------------------------
# Computation
# --------------------------------------------------------------------------------------------


def _num_frames(cfg: LogMelConfig, num_samples: int) -> int:
    padded = max(num_samples, cfg.n_fft, cfg.win_length) + 2 * (cfg.n_fft // 2)
    return 1 + (padded - cfg.n_fft) // cfg.hop_length


def _prepare_signal(x: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """Whole padded signal at once (reference for :class:`_Signal`, used by tests).

    Signal normalization, pre-emphasis, right zero-pad and centre reflect-pad, in float32.

    Normalization and pre-emphasis are fused: with ``s = 1 / max(max|x - m|, 1e-6)``,
    ``y[n] = s * (x[n] - c * x[n-1]) - s * m * (1 - c)`` and ``y[0] = s * (x[0] - m)``; this
    equals upstream's normalize-then-pre-emphasize up to float32 rounding.

    Args:
        x: ``float32 (num_samples,)`` at ``cfg.sample_rate``.
        cfg: frontend settings.

    Returns:
        ``float32 (max(num_samples, n_fft, win_length) + 2 * (n_fft // 2),)``.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    pad = cfg.n_fft // 2
    length = max(n, cfg.n_fft, cfg.win_length)
    out = np.empty(length + 2 * pad, dtype=np.float32)
    mid = out[pad : pad + length]
    mid[n:] = 0.0
    body = mid[:n]
    mean, scale = 0.0, 1.0
    if cfg.normalize_signal and n:
        mean = float(x.mean())
        scale = 1.0 / max(float(x.max()) - mean, mean - float(x.min()), PEAK_FLOOR)
    c = cfg.preemphasis
    if c > 0 and n > 1:
        np.multiply(x[:-1], np.float32(c), out=body[1:])
        np.subtract(x[1:], body[1:], out=body[1:])
        body[0] = x[0]
        if cfg.normalize_signal:
            body *= np.float32(scale)
            body[1:] -= np.float32(scale * mean * (1.0 - c))
            body[0] = np.float32((float(x[0]) - mean) * scale)
    elif cfg.normalize_signal and n:
        np.subtract(x, np.float32(mean), out=body)
        body *= np.float32(scale)
    else:
        body[...] = x
    out[:pad] = mid[pad:0:-1]  # reflect, as torch/np.pad mode="reflect"
    out[pad + length :] = mid[-2 : -pad - 2 : -1]
    return out


class _Signal:
    """Lazily evaluated padded signal of one utterance (upstream steps 2-5 before framing).

    ``P[p]`` for ``0 <= p < length + 2 * pad`` is the mean-removed, pre-emphasized, zero-extended
    (to ``length = max(n, n_fft, win_length)``) and reflect-padded signal, **not** divided by the
    peak: the peak scale ``s`` of signal normalization is applied in the log domain instead,
    ``log(max(s^2 P, 1e-5)) = log(max(P, 1e-5 / s^2)) + 2 log s`` (:attr:`floor`,
    :attr:`log_gain`), which saves a pass over the samples. :meth:`fill` writes any range of
    ``P`` into a reused scratch buffer, so no per-utterance copy is allocated.
    """

    __slots__ = ("x", "n", "length", "pad", "c", "norm", "scale", "mean", "floor", "log_gain")

    def __init__(self, x: np.ndarray, cfg: LogMelConfig):
        self.x = x
        self.n = x.shape[0]
        self.length = max(self.n, cfg.n_fft, cfg.win_length)
        self.pad = cfg.n_fft // 2
        self.c = float(cfg.preemphasis)
        self.norm = bool(cfg.normalize_signal and self.n)
        self.mean, self.scale = 0.0, 1.0
        if self.norm:
            # == float(x.mean()) (float32 pairwise sum, float32 division) without its overhead
            self.mean = float(np.add.reduce(x) / self.n)
            peak = max(float(np.maximum.reduce(x)) - self.mean, self.mean - float(np.minimum.reduce(x)))
            self.scale = 1.0 / max(peak, PEAK_FLOOR)
        self.floor = np.float32(LOG_FLOOR / self.scale**2)
        self.log_gain = np.float32(2.0 * np.log(self.scale))

    def _y(self, i0: int, i1: int, out: np.ndarray) -> None:
        """``out[:i1 - i0] = y[i0:i1]`` for ``0 <= i0 <= i1 <= length`` (unpadded signal)."""
        x, n, c = self.x, self.n, self.c
        k = out[: i1 - i0]
        lo, hi = max(i0, 1), min(i1, n)
        if lo < hi:
            seg = k[lo - i0 : hi - i0]
            if c > 0:
                np.multiply(x[lo - 1 : hi - 1], np.float32(-c), out=seg)
                seg += x[lo:hi]
            else:
                seg[...] = x[lo:hi]
            if self.norm:
                seg -= np.float32(self.mean * (1.0 - c))
        if i0 == 0 and i1 > 0 and n > 0:
            k[0] = float(x[0]) - self.mean
        if i1 > n:
            k[max(n, i0) - i0 :] = 0.0

    def fill(self, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """Return ``P[a:b]``: written into ``out[:b - a]``, or a view of the input when the range
        is interior and untransformed (no pre-emphasis, no signal normalization)."""
        pad, length = self.pad, self.length
        if a >= pad and b <= pad + self.n and self.c == 0 and not self.norm:
            return self.x[a - pad : b - pad]  # interior, untransformed: no copy needed
        dst = out[: b - a]
        left_end = min(b, pad)
        if a < left_end:  # P[p] = y[pad - p]
            i0, i1 = pad - left_end + 1, pad - a + 1
            self._y(i0, i1, dst)
            dst[: i1 - i0] = dst[: i1 - i0][::-1].copy()
        p0, p1 = max(a, pad), min(b, pad + length)
        if p0 < p1:
            self._y(p0 - pad, p1 - pad, dst[p0 - a :])
        right_start = max(a, pad + length)
        if right_start < b:  # P[p] = y[2 (length - 1) - (p - pad)]
            i1 = 2 * (length - 1) - (right_start - pad) + 1
            i0 = 2 * (length - 1) - (b - 1 - pad)
            tail = dst[right_start - a :]
            self._y(i0, i1, tail)
            tail[: i1 - i0] = tail[: i1 - i0][::-1].copy()
        return dst


def _rfft_rows(frames: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[:] = scipy.fft.rfft(frames, axis=1)`` (float32 -> complex64), written in place.

    ``scipy.fft.rfft`` has no ``out=``: it allocates a fresh complex64 result per block, whose
    first touch costs about one page fault per 4 KiB (~2x the transform itself on 10 s
    utterances). scipy's pocketfft binding takes ``out``; the public function is the fallback.
    Rows are transformed independently (a row gives the same bits alone or in a block).
    """
    r2c = _r2c()
    if r2c is not None:
        return r2c(frames, (1,), True, 0, out, 1)
    import scipy.fft

    np.copyto(out, scipy.fft.rfft(frames, axis=1, workers=1))
    return out


def _rows_op(op: np.ufunc, x: np.ndarray, row: np.ndarray, tiled: np.ndarray) -> None:
    """``op(x, row, out=x)`` for C-contiguous ``x (n, m)`` and ``row (m,)``.

    Broadcasting a short row runs numpy's inner loop once per row (~20 ns each); operating on
    groups of ``len(tiled) // m`` rows against ``tiled = tile(row, k)`` gives the same
    (element-wise) result several times faster.
    """
    n, m = x.shape
    k = tiled.shape[0] // m
    q = n // k
    if q:
        head = x[: q * k].reshape(q, k * m)
        op(head, tiled, out=head)
    if q * k < n:
        op(x[q * k :], row, out=x[q * k :])


def _standardize_columns(x: np.ndarray) -> None:
    """:func:`~.base.normalize_columns` with ``ddof=0, std_floor=STD_FLOOR, axis=0``, in place
    and bit for bit (same float64 mean, same sums), with faster row-broadcast passes."""
    n, m = x.shape
    if n == 0:
        return
    mean = x.sum(axis=0, dtype=np.float64) / n
    mean32 = mean.astype(np.float32)
    k = _TILE_ELEMS // m
    tiled = n >= 2 * k > 0
    if tiled:
        _rows_op(np.subtract, x, mean32, np.tile(mean32, k))
    else:
        np.subtract(x, mean32, out=x)
    std = np.sqrt(np.einsum("ij,ij->j", x, x).astype(np.float64) / n)
    constant = std <= CONSTANT_COLUMN_ULPS * _EPS32 * np.abs(mean)
    scale = (1.0 / np.maximum(std, STD_FLOOR)).astype(np.float32)
    scale[constant] = 0.0
    if tiled:
        _rows_op(np.multiply, x, scale, np.tile(scale, k))
    else:
        np.multiply(x, scale, out=x)


_LOCAL = threading.local()


def _buffers(chunk: int, n_fft: int, hop: int, n_mels: int) -> tuple[np.ndarray, ...]:
    """Per-thread block buffers ``(samples, frames, spectrum, mel)`` for ``chunk`` frames.

    Looked up once per call (one dict access instead of four :func:`~.base.scratch` calls,
    which matters for short utterances). Uninitialized content.
    """
    key = (chunk, n_fft, hop, n_mels)
    cache = _LOCAL.__dict__.setdefault("buffers", {})
    bufs = cache.get(key)
    if bufs is None:
        bufs = (
            scratch(f"logmel.samples{key}", ((chunk - 1) * hop + n_fft,), np.float32),
            scratch(f"logmel.frames{key}", (chunk, n_fft), np.float32),
            scratch(f"logmel.spec{key}", (chunk, n_fft // 2 + 1), np.complex64),
            scratch(f"logmel.mel{key}", (chunk, n_mels), np.float32),
        )
        cache[key] = bufs
    return bufs


def logmel_batch(signals: Sequence[np.ndarray], cfg: LogMelConfig) -> list[np.ndarray]:
    """Compute HTK log-mel features for several utterances at ``cfg.sample_rate``.

    Frames of all utterances are packed into blocks of :data:`CHUNK_FRAMES`, each transformed by
    one real FFT (scipy's pocketfft, one thread, into a reused buffer) and one banded mel
    projection; the padded signal of each block is computed into a reused scratch buffer (no
    per-utterance copies).

    Output is deterministic per frame: batching, block boundaries and call grouping do not
    change a single bit, on any BLAS kernel and thread count (element-wise signal and window
    arithmetic, row-independent FFT, and a mel projection rounded from its exact value, see
    :class:`~.base.MelBands`).

    Args:
        signals: mono utterances, each ``float32 (num_samples,)`` in [-1, 1].
        cfg: frontend settings.

    Returns:
        One ``float32 (num_frames, n_mels)`` array per utterance, natural-log mel power,
        standardized per column when ``cfg.normalize_feature``.
    """
    window, bands = _tables(cfg.n_fft, cfg.win_length, cfg.n_mels, cfg.sample_rate)
    sigs = [_Signal(np.ascontiguousarray(x, dtype=np.float32), cfg) for x in signals]
    counts = [_num_frames(cfg, s.n) for s in sigs]
    outs = [np.empty((c, cfg.n_mels), dtype=np.float32) for c in counts]
    n_fft, hop = cfg.n_fft, cfg.hop_length
    samples, buf, spec, mel = _buffers(CHUNK_FRAMES, n_fft, hop, cfg.n_mels)
    for block in frame_chunks(counts, CHUNK_FRAMES):
        rows = block[-1][3] + block[-1][2]
        for idx, start, take, row in block:
            seg = sigs[idx].fill(start * hop, (start + take - 1) * hop + n_fft, samples)
            # Overlapping frames as a strided view (the ndarray constructor has far less
            # per-call overhead than as_strided / sliding_window_view).
            frames = np.ndarray((take, n_fft), np.float32, seg, 0, (hop * 4, 4))
            # einsum's product loop is faster than np.multiply's broadcast loop here (one
            # correctly rounded product per element either way).
            np.einsum("ij,j->ij", frames, window, out=buf[row : row + take])
        _rfft_rows(buf[:rows], spec[:rows])
        bands.power_mel(spec[:rows], mel[:rows])  # BLAS-independent: see MelBands
        for idx, start, take, row in block:
            sig, part, dst = sigs[idx], mel[row : row + take], outs[idx][start : start + take]
            np.maximum(part, sig.floor, out=part)
            np.log(part, out=dst)
            if sig.norm and not cfg.normalize_feature:  # standardization would cancel it
                dst += sig.log_gain
    if cfg.normalize_feature:
        for out in outs:
            if cfg.normalize_per_frame:
                normalize_columns(out, ddof=0, std_floor=STD_FLOOR, axis=1)
            else:
                _standardize_columns(out)
    return outs


def compute_logmel(samples: np.ndarray, cfg: LogMelConfig = SQUEEZEFORMER_CONFIG) -> np.ndarray:
    """Compute HTK log-mel features of one utterance (pure function).

    Args:
        samples: ``float32 (num_samples,)`` mono in [-1, 1] at ``cfg.sample_rate`` Hz.
        cfg: frontend settings.

    Returns:
        ``float32 (num_frames, n_mels)`` with
        ``num_frames = max(num_samples, n_fft) // hop_length + 1`` (even ``n_fft``).
    """
    return logmel_batch([samples], cfg)[0]


class LogMelFrontend(Frontend):
    """HTK log-mel frontend: torchaudio ``MelSpectrogram`` (HTK mel, norm=None, centre, reflect,
    power 2) + ``log(max(., 1e-5))`` + optional standardization (upstream ``AudioFeaturizer``).

    Output: ``float32 (num_frames, n_mels)``, natural log of mel power (audio normalized to
    peak 1 when ``normalize_signal``), standardized per mel column over the utterance when
    ``normalize_feature`` (so chunked input gives different values than the whole clip).

    Args:
        name: registry name.
        config: keyed settings.
    """

    def __init__(self, name: str, config: LogMelConfig):
        self.name = name
        self.config = config
        self.feature_dim = config.n_mels
        self.sample_rate = config.sample_rate
        self.min_num_samples = 1

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def num_frames(self, num_samples_16k: int) -> int:
        """Exact rows: ``1 + (max(n, n_fft, win_length) + 2*(n_fft//2) - n_fft) // hop``."""
        if num_samples_16k <= 0:
            return 0
        return _num_frames(self.config, int(num_samples_16k))

    def estimate_num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Upstream ``estimate_num_feature_frames`` (spec 4.5): exact for even ``n_fft``.

        ``eff = max(1, ceil(n * sr_target / sr))`` when rates differ, then
        ``max(1, max(eff, n_fft, win_length) // hop + 1)``; 0 for ``n <= 0``.
        """
        if num_samples <= 0 or sample_rate <= 0:
            return 0
        eff = effective_num_samples(num_samples, sample_rate, self.sample_rate)
        cfg = self.config
        return max(1, max(eff, cfg.n_fft, cfg.win_length) // cfg.hop_length + 1)

    def batch(self, samples_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        for x in samples_16k:
            self.check_length(np.asarray(x).shape[0])
        return logmel_batch(samples_16k, self.config)
