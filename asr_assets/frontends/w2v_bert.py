"""``w2v-bert`` frontend: Kaldi-style fbank, per-bin normalization, stride-2 stacking (spec 4.4).

Public entry points:
    * :class:`W2VBertConfig` - the keyed config, fields in upstream order.
    * :class:`W2VBertFrontend` - the frontend (registered as ``w2v-bert``).
    * :func:`make_w2v_bert` - registry factory taking CLI-style overrides.
    * :func:`kaldi_mel_filterbank` - HF ``mel_filter_bank(mel_scale="kaldi",
      triangularize_in_mel_space=True, norm=None)``.

Algorithm: HF ``SeamlessM4TFeatureExtractor`` (``feature_extraction_seamless_m4t.py`` with
``audio_utils.spectrogram``), as restated by upstream Rust ``dsp.rs::compute_w2v_bert_features``:
scale by 2**15, snip-edges framing (400 samples, hop 160), per-frame DC removal, per-frame
pre-emphasis 0.97, symmetric Povey window, 512-point FFT, power, 80 Kaldi mel bands
(20-8000 Hz), ``ln(max(., float32 eps))``, per-bin ``(x - mean) / sqrt(var_ddof1 + 1e-7)``,
pad to an even frame count with ``padding_value`` and stack frame pairs into 160 columns.

Implementation notes (batched; float64 up to the FFT, float32 after it, see
:func:`fbank_batch`): per-frame DC removal and pre-emphasis are linear, so a frame equals
``w * (g[s:s+400] - 0.03 * mean(x[s:s+400]))`` where ``g[n] = x[n] - 0.97 x[n-1]`` is the
pre-emphasis of the whole signal. Sample 0 of a frame should be ``0.03 * (x[s] - mean)`` instead
of ``g[s] - 0.03 * mean``, but the Povey window is exactly 0 there, so both give 0. The DC term is removed with one BLAS
rank-1 update per block. The int16 scaling (2**15, exact) is folded into the window.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from asr_assets.errors import FeatureConfigError

from .base import (
    CHUNK_FRAMES,
    Frontend,
    MelBands,
    check_float,
    check_positive_int,
    effective_num_samples,
    frame_chunks,
    normalize_columns,
    scratch,
)

FRAME_LENGTH = 400  #: samples per frame (25 ms at 16 kHz)
HOP_LENGTH = 160  #: frame shift in samples (10 ms)
FFT_LENGTH = 512  #: FFT size; 257 one-sided bins
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  #: float32 eps, HF ``mel_floor``
VAR_OFFSET = 1e-7  #: added to the unbiased variance before the square root
INT16_SCALE = 32768.0  #: "Kaldi int16 compliance" scaling of [-1, 1] audio
MIN_FREQUENCY = 20.0
DEFAULT_MODEL_SOURCE = "facebook/w2v-bert-2.0"
_SUM_BLOCK = 80  #: samples per partial sum of the frame means (hop and frame are multiples)


@dataclasses.dataclass(frozen=True)
class W2VBertConfig:
    """Keyed settings of the w2v-bert frontend (upstream ``RustW2VBertFeatureExtractor``).

    Field order is the upstream ``config_dict`` order and part of the cache key.

    Attributes:
        type: always ``"w2v_bert"``.
        model_source: model id or path; only part of the key. (Default: facebook/w2v-bert-2.0)
        sample_rate: working rate in Hz. (Default: 16000)
        feature_size: number of Kaldi mel bands. (Default: 80)
        stride: frames stacked per output row. (Default: 2)
        feature_dim: output columns, always ``feature_size * stride``. (Default: 160)
        padding_value: value of the frames appended to reach a multiple of ``stride``.
            (Default: 1.0, as ``facebook/w2v-bert-2.0``'s preprocessor config)
    """

    type: str = "w2v_bert"
    model_source: str = DEFAULT_MODEL_SOURCE
    sample_rate: int = 16000
    feature_size: int = 80
    stride: int = 2
    feature_dim: int = 160
    padding_value: float = 1.0

    def __post_init__(self) -> None:
        if self.type != "w2v_bert":
            raise FeatureConfigError(f"type must be 'w2v_bert', got {self.type!r}")
        if not isinstance(self.model_source, str) or not self.model_source:
            raise FeatureConfigError(f"model_source must be a non-empty str, got {self.model_source!r}")
        for name in ("sample_rate", "feature_size", "stride", "feature_dim"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        object.__setattr__(self, "padding_value", check_float("padding_value", self.padding_value))
        if self.feature_dim != self.feature_size * self.stride:
            raise FeatureConfigError(
                f"feature_dim must equal feature_size * stride = {self.feature_size * self.stride}, "
                f"got {self.feature_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a dict in upstream key order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: Accepted override keys; ``n_mels`` is an alias of ``feature_size`` (upstream CLI).
_OVERRIDE_KEYS = ("model_source", "sample_rate", "feature_size", "n_mels", "stride", "padding_value")


def make_w2v_bert(**overrides: Any) -> "W2VBertFrontend":
    """Registry factory: ``W2VBertFrontend`` with CLI-style overrides.

    ``feature_dim`` follows ``feature_size * stride``; ``n_mels`` overrides ``feature_size``
    (upstream ``--n-mels`` does).

    Raises:
        FeatureConfigError: unknown key (the valid ones are listed) or invalid value.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDE_KEYS))
    if unknown:
        raise FeatureConfigError(
            f"unknown override(s) {unknown!r} for frontend 'w2v-bert'; valid keys: {list(_OVERRIDE_KEYS)}"
        )
    values = dict(overrides)
    if "n_mels" in values:
        values["feature_size"] = values.pop("n_mels")
    size = values.get("feature_size", 80)
    stride = values.get("stride", 2)
    if isinstance(size, int) and isinstance(stride, int):
        values["feature_dim"] = size * stride
    return W2VBertFrontend(W2VBertConfig(**values))


def _hz_to_mel_kaldi(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_kaldi(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (np.exp(np.asarray(mel, dtype=np.float64) / 1127.0) - 1.0)


def kaldi_mel_filterbank(num_bins: int, num_mels: int, sample_rate: int, f_min: float = MIN_FREQUENCY) -> np.ndarray:
    """Kaldi mel filterbank triangularized in mel space (HF ``mel_filter_bank`` kaldi, norm=None).

    ``num_mels + 2`` points equally spaced on ``1127 * ln(1 + f / 700)`` from ``f_min`` to
    ``sample_rate // 2``; the FFT bin centres ``k * sample_rate / (2 * (num_bins - 1))`` are mapped
    to mel and the triangles are built between mel points.

    Args:
        num_bins: one-sided FFT bins (257 for a 512-point FFT).
        num_mels: number of bands.
        sample_rate: rate in Hz.
        f_min: lowest band edge in Hz.

    Returns:
        ``float64 (num_bins, num_mels)`` weights in [0, 1].
    """
    mel_pts = np.linspace(_hz_to_mel_kaldi(f_min), _hz_to_mel_kaldi(sample_rate // 2), num_mels + 2)
    bin_width = sample_rate / ((num_bins - 1) * 2)
    fft_mels = _hz_to_mel_kaldi(bin_width * np.arange(num_bins))
    diff = np.diff(mel_pts)
    slopes = mel_pts[None, :] - fft_mels[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


@functools.lru_cache(maxsize=8)
def _tables(num_mels: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray, MelBands]:
    """Return ``(povey * 2**15 float64 (400,), povey zero-padded float64 (512,), MelBands)``.

    The first window carries the int16 scaling (a power of two, so exact): frames are windowed
    from the unscaled pre-emphasized signal, which saves a pass over the samples.
    """
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    povey = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (FRAME_LENGTH - 1))) ** 0.85  # symmetric
    padded = np.zeros(FFT_LENGTH, dtype=np.float64)
    padded[:FRAME_LENGTH] = povey
    bands = MelBands(kaldi_mel_filterbank(FFT_LENGTH // 2 + 1, num_mels, sample_rate))
    return povey * INT16_SCALE, padded, bands


def num_fbank_frames(num_samples: int) -> int:
    """Snip-edges frame count ``1 + (n - 400) // 160`` for ``n >= 400``, else 0."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // HOP_LENGTH


def fbank_batch(signals: Sequence[np.ndarray], num_mels: int = 80, sample_rate: int = 16000) -> list[np.ndarray]:
    """Kaldi-style log-mel fbank (before normalization) for several utterances.

    Precision: framing, DC removal, pre-emphasis, windowing and the FFT run in **float64**, the
    spectrum is then rounded to complex64 (as HF stores it) and power, mel projection and log
    run in float32. A float32 FFT input was measured to deviate from HF by up to 0.03-0.05 after
    normalization in near-silent mel bands (Vorbis-lowpassed or upsampled 8 kHz audio), because
    the frame's rounding noise (~-150 dB) exceeds those bands; float64 keeps the deviation
    ~1e-6 for about 1.6x the FFT cost. A mixed scheme (float32 FFT for every frame, float64
    again for the frames where some mel band comes within a safety margin of the float32
    noise floor, ``|d ln E_b| <~ 30 eps32 sqrt(E_frame / (257 E_b))``) was measured and dropped:
    at a margin that keeps the limits, 20-30 % of real speech frames and ~99 % of band-limited
    frames need the float64 pass, which made the FFT stage 20-35 % slower, not faster.

    Output is deterministic per frame: batching, block boundaries and call grouping do not
    change a single bit (the int16 scaling is a power of two folded into the window, frame
    means are fixed-order sums of 80-sample partial sums, the mel projection is rounded from its
    exact value, see :class:`~.base.MelBands`).

    Args:
        signals: ``float32 (num_samples,)`` mono utterances in [-1, 1].
        num_mels: bands.
        sample_rate: rate in Hz.

    Returns:
        One ``float32 (num_frames, num_mels)`` natural-log mel power (int16-scaled audio)
        per utterance; ``num_frames = num_fbank_frames(num_samples)``.
    """
    from scipy.linalg.blas import dger as _blas_dger  # imported on first use, not by `asr-assets frontends`

    window, window512, bands = _tables(num_mels, sample_rate)
    xs = [np.ascontiguousarray(x, dtype=np.float32) for x in signals]
    counts = [num_fbank_frames(x.shape[0]) for x in xs]
    outs = [np.empty((c, num_mels), dtype=np.float32) for c in counts]
    size = min(CHUNK_FRAMES, max(sum(counts), 1))
    # Reused scratch (float64): per segment, the samples and their pre-emphasis, so no
    # per-utterance float64 copy is allocated (fresh pages cost a fault per 512 samples).
    span = (size - 1) * HOP_LENGTH + FRAME_LENGTH
    raw = scratch("w2v.raw", (span + 1,), np.float64)
    emph = scratch("w2v.emph", (span,), np.float64)
    sums = scratch("w2v.sums", (span // _SUM_BLOCK,), np.float64)
    buf = scratch("w2v.frames", (size, FFT_LENGTH), np.float64)
    buf[:, FRAME_LENGTH:] = 0.0  # zero padding to the FFT length
    offsets = scratch("w2v.offsets", (size,), np.float64)
    full = scratch("w2v.spec128", (size, FFT_LENGTH // 2 + 1), np.complex128)
    spec = scratch("w2v.spec", (size, FFT_LENGTH // 2 + 1), np.complex64)
    mel = scratch("w2v.mel", (size, num_mels), np.float32)
    dc_scale = (1.0 - PREEMPHASIS) * INT16_SCALE / FRAME_LENGTH
    for block in frame_chunks(counts, CHUNK_FRAMES):
        rows = block[-1][3] + block[-1][2]
        for idx, start, take, row in block:
            x = xs[idx]
            a = start * HOP_LENGTH
            b = (start + take - 1) * HOP_LENGTH + FRAME_LENGTH
            seg = raw[: b - a + 1]
            seg[0] = float(x[a - 1]) if a > 0 else 0.0  # frame sample 0 has weight 0
            np.copyto(seg[1:], x[a:b])
            g = emph[: b - a]
            np.multiply(seg[:-1], PREEMPHASIS, out=g)
            np.subtract(seg[1:], g, out=g)
            view = np.ndarray((take, FRAME_LENGTH), np.float64, emph, 0, (HOP_LENGTH * 8, 8))  # frames of g
            # einsum's product loop is ~1.8x faster here than np.multiply's broadcast loop
            # (one correctly rounded product per element either way).
            np.einsum("ij,j->ij", view, window, out=buf[row : row + take, :FRAME_LENGTH])
            # Frame sums from 80-sample block sums, frame i = blocks 2i .. 2i+4, added in a
            # fixed order per frame (independent of how frames are split into blocks).
            s = sums[: (b - a) // _SUM_BLOCK]
            np.einsum("ij->i", seg[1:].reshape(-1, _SUM_BLOCK), out=s)  # ~2x faster than np.sum here
            off = offsets[row : row + take]
            np.add(s[0 : 2 * take : 2], s[1 : 2 * take + 1 : 2], out=off)
            for j in (2, 3, 4):
                np.add(off, s[j : 2 * take + j : 2], out=off)
            np.multiply(off, dc_scale, out=off)
        # Remove the pre-emphasized DC of each frame: buf -= offsets (x) window, one BLAS
        # rank-1 update on the Fortran-ordered transpose (in place).
        updated = _blas_dger(-1.0, window512, offsets[:rows], a=buf[:rows].T, overwrite_a=True)
        if not np.shares_memory(updated, buf):  # f2py copied instead of updating in place
            buf[:rows] = updated.T
        # numpy's pocketfft writes into the reused buffer (scipy.fft allocates a fresh
        # complex128 result per block) and transforms each row independently.
        np.fft.rfft(buf[:rows], axis=1, out=full[:rows])
        np.copyto(spec[:rows], full[:rows], casting="same_kind")
        bands.power_mel(spec[:rows], mel[:rows])  # BLAS-independent: see MelBands
        np.maximum(mel[:rows], np.float32(MEL_FLOOR), out=mel[:rows])
        for idx, start, take, row in block:
            np.log(mel[row : row + take], out=outs[idx][start : start + take])
    return outs


def _normalize_and_stack(feat: np.ndarray, cfg: W2VBertConfig) -> np.ndarray:
    """Per-bin normalization (ddof 1, +1e-7), pad to a multiple of ``stride``, stack."""
    normalize_columns(feat, ddof=1, var_offset=VAR_OFFSET)
    frames = feat.shape[0]
    rem = frames % cfg.stride
    if rem:
        pad = np.full((cfg.stride - rem, feat.shape[1]), cfg.padding_value, dtype=np.float32)
        feat = np.concatenate([feat, pad])
    return feat.reshape(-1, cfg.feature_dim)


class W2VBertFrontend(Frontend):
    """w2v-bert frontend (HF ``SeamlessM4TFeatureExtractor(padding_value=1.0)``, Kaldi fbank).

    Output: ``float32 (ceil(num_frames / stride), feature_size * stride)``; row ``j`` is frames
    ``2j`` and ``2j+1`` (each 80 standardized natural-log mel energies) side by side; the
    padding frame, if any, holds ``padding_value``. Normalization is per utterance, so chunked
    input gives different values than the whole clip.

    Edge cases follow upstream Rust: inputs shorter than 400 samples give 0 rows from
    :meth:`batch` (and :meth:`__call__` raises :class:`FeatureConfigError`); a single frame
    normalizes to zeros (HF gives NaN).

    Args:
        config: keyed settings.
    """

    name = "w2v-bert"
    min_num_samples = FRAME_LENGTH

    def __init__(self, config: W2VBertConfig = W2VBertConfig()):
        self.config = config
        self.feature_dim = config.feature_dim
        self.sample_rate = config.sample_rate

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def num_frames(self, num_samples_16k: int) -> int:
        """Exact rows: ``ceil((1 + (n - 400) // 160) / stride)`` for ``n >= 400``, else 0."""
        return -(-num_fbank_frames(int(num_samples_16k)) // self.config.stride)

    def estimate_num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Upstream estimate (spec 4.5): ``max(1, ceil(eff / (160 * stride)))``, 0 for n <= 0.

        An approximation: 1 s gives 50 where the exact count is 49.
        """
        if num_samples <= 0 or sample_rate <= 0:
            return 0
        eff = effective_num_samples(num_samples, sample_rate, self.sample_rate)
        return max(1, -(-eff // (HOP_LENGTH * self.config.stride)))

    def batch(self, samples_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Compute features of utterances at :attr:`sample_rate`; < 400 samples give 0 rows.

        Args:
            samples_16k: ``float32 (num_samples,)`` mono utterances in [-1, 1].

        Returns:
            One ``float32 (num_rows, feature_dim)`` array per utterance.
        """
        feats = fbank_batch(samples_16k, self.config.feature_size, self.config.sample_rate)
        return [_normalize_and_stack(f, self.config) for f in feats]
