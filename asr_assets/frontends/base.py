"""Frontend base class, upstream-compatible config rendering and shared DSP helpers.

Public entry points:
    * :class:`Frontend` - the interface every feature frontend implements.
    * :func:`py_float` - renders a float exactly as upstream Rust ``FrontendConfig::config_repr``.
    * :func:`render_config_repr` - Python-``repr``-style rendering of a config dict.
    * :func:`check_output_dtypes`, :func:`check_named_outputs` - declared named outputs and
      the arrays a multi-output frontend returns.

Cache keys (spec ``upstream-compat.md`` section 3.2) are
``sha256(repr({"featurizer": config_dict}))[:12]``; the three upstream frontends keep that key
byte for byte, and every other frontend derives its key through the same code path.

Named outputs (an asr_assets extension; upstream has none): a frontend may declare
``outputs = {name: numpy dtype}`` (e.g. SSL features as ``float16`` plus discrete tokens as
``int32``). It then returns ``{name: array}`` and each output has its own hash,
:meth:`Frontend.output_hash`: ``sha256(repr({"featurizer": {**config_dict, "output": name}}))[:12]``,
rendered by :func:`render_config_repr` like every other key. A frontend without ``outputs``
(every built-in one) is unchanged: one ``float32 (num_frames, feature_dim)`` array under
:meth:`Frontend.frontend_hash`.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np

from asr_assets.errors import FeatureConfigError

#: Frames processed per FFT/GEMM block (packed across utterances). Small blocks keep the working
#: set in L2 and avoid the page faults of whole-array processing of long audio (performance
#: notes); 256 measured best or tied among 128-2,048 on this machine.
CHUNK_FRAMES = 256

#: Smallest normal float32; below it the float32 grid is absolute (subnormals).
_F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
#: float32 machine epsilon, used by the constant-column rule (see :func:`normalize_columns`).
_EPS32 = float(np.finfo(np.float32).eps)

#: A column whose standard deviation is at most this many float32 ulps of its mean is treated
#: as constant (see :func:`normalize_columns`).
CONSTANT_COLUMN_ULPS = 8.0


# --------------------------------------------------------------------------------------------
# Config rendering (upstream Rust ``config_repr`` / ``py_float``)
# --------------------------------------------------------------------------------------------


def py_float(value: float) -> str:
    """Render a float as upstream Rust ``py_float`` does.

    Upstream formats the value as an **f32** with Rust ``{:?}`` (shortest string that round-trips
    through f32; scientific notation below 1e-4 or from 1e16 on, e.g. ``1e-7``, ``1.5e16``) and
    appends ``.0`` when the text has neither ``.`` nor ``e``.

    Args:
        value: any real number; it is rounded to float32 first, as upstream stores it.

    Returns:
        The rendered text, e.g. ``0.97 -> "0.97"``, ``0 -> "0.0"``, ``1e-7 -> "1e-7"``.
    """
    v = np.float32(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    a = np.abs(v)  # compared in f32, as Rust ``already_rounded_value_should_use_exponential``
    if a == 0 or np.float32(1e-4) <= a < np.float32(1e16):
        text = np.format_float_positional(v, unique=True, trim="-")
    else:
        sci = np.format_float_scientific(v, unique=True, trim="-")  # e.g. "1.5e-07", "1e+16"
        mantissa, exponent = sci.split("e")
        text = f"{mantissa}e{int(exponent)}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return py_float(float(value))
    if isinstance(value, str):
        # Upstream Rust hand-formats strings in single quotes and escapes ``'`` as ``\'``.
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_render_value(k)}: {_render_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_render_value(v) for v in value)
        if isinstance(value, tuple):
            return "(" + inner + ("," if len(value) == 1 else "") + ")"
        return "[" + inner + "]"
    raise TypeError(
        f"config value {value!r} of type {type(value).__name__} cannot be part of a cache key; "
        "use bool, int, float, str, None, list, tuple or dict"
    )


def render_config_repr(config: Mapping[str, Any]) -> str:
    """Render ``repr({"featurizer": config})`` the way upstream does.

    Booleans print as ``True``/``False``, ints as Python ints, floats through :func:`py_float`
    (f32 rendering), strings single-quoted; insertion order is kept.

    Args:
        config: the frontend's config dict, in its significant key order.

    Returns:
        The repr string hashed into the cache key.
    """
    return _render_value({"featurizer": config})


def hash12(text: str) -> str:
    """Return ``sha256(text.encode("utf-8")).hexdigest()[:12]`` (upstream ``frontend_hash``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Named outputs
# --------------------------------------------------------------------------------------------

#: numpy dtype kinds a named output may have: bool, signed and unsigned int, float. Object,
#: string, structured and complex arrays are refused (the first would need pickle to store).
OUTPUT_DTYPE_KINDS = "biuf"
#: source dtype kinds cast to a declared kind: floats take any real, ints any integer (range
#: checked), bools only bools
_CASTABLE_FROM = {"f": "biuf", "i": "biu", "u": "biu", "b": "b"}
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_output_dtypes(frontend_name: str, outputs: Mapping[str, Any]) -> dict[str, str]:
    """Validate declared named outputs.

    Args:
        frontend_name: for the messages.
        outputs: ``{name: dtype}`` (anything :class:`numpy.dtype` accepts, e.g. ``"float16"``,
            ``np.int32``), in order; the first output gives the ``frames`` statistic.

    Returns:
        ``{name: canonical dtype name}`` (``np.dtype(d).name``, e.g. ``"float16"``), same order.

    Raises:
        FeatureConfigError: no output, a name that is not ``[A-Za-z0-9][A-Za-z0-9_.-]*``, or a
            dtype that is not bool, int, uint or float.
    """
    if not isinstance(outputs, Mapping) or not outputs:
        raise FeatureConfigError(f"outputs of frontend {frontend_name!r} must be a non-empty dict "
                                 f"{{name: numpy dtype}}, got {outputs!r}")
    checked: dict[str, str] = {}
    for name, dtype in outputs.items():
        if not isinstance(name, str) or not _OUTPUT_NAME.fullmatch(name):
            raise FeatureConfigError(f"output name {name!r} of frontend {frontend_name!r} must match "
                                     "[A-Za-z0-9][A-Za-z0-9_.-]*")
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise FeatureConfigError(f"output {name!r} of frontend {frontend_name!r}: {dtype!r} is not a numpy "
                                     "dtype") from exc
        if dt.kind not in OUTPUT_DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise FeatureConfigError(f"output {name!r} of frontend {frontend_name!r} has dtype {dt}; use a bool, "
                                     "int, uint or float dtype (object arrays would need pickle, which is never used)")
        checked[name] = dt.name
    return checked


def check_named_outputs(frontend_name: str, outputs: Mapping[str, str], result: Any) -> dict[str, np.ndarray]:
    """Check and cast what a multi-output frontend returned for one utterance.

    Args:
        frontend_name: for the messages.
        outputs: the declared ``{name: dtype}`` (:func:`check_output_dtypes`).
        result: the frontend function's return value.

    Returns:
        ``{name: C-contiguous array of the declared dtype}``, in declared order: each non-empty,
        frames first, ``(num_frames,)`` or ``(num_frames, dims)``, floats finite.

    Raises:
        FeatureConfigError: not a dict of exactly the declared names; a value that is not a real
            array, cannot be cast to its dtype without changing kind (``same_kind``: a float for
            an int output is refused) or holds integers outside the dtype's range; ``ndim`` not
            1 or 2; no frame or an empty row; a non-finite float.
    """
    if not isinstance(result, Mapping) or set(result) != set(outputs):
        got = sorted(result) if isinstance(result, Mapping) else type(result).__name__
        raise FeatureConfigError(f"frontend {frontend_name!r} must return a dict with exactly the outputs "
                                 f"{list(outputs)}, got {got!r}")
    checked: dict[str, np.ndarray] = {}
    for name, dtype in outputs.items():
        value = np.asarray(result[name])
        dt = np.dtype(dtype)
        where = f"output {name!r} of frontend {frontend_name!r}"
        if value.dtype.kind not in OUTPUT_DTYPE_KINDS:
            raise FeatureConfigError(f"{where} is {value.dtype}, not a real array")
        if value.dtype.kind not in _CASTABLE_FROM[dt.kind]:
            raise FeatureConfigError(f"{where} is {value.dtype}, which cannot become {dt} without changing kind "
                                     "(round, threshold or argmax it in the frontend)")
        if dt.kind in "iu" and value.size and value.dtype != dt:
            info = np.iinfo(dt)
            low, high = value.min(), value.max()
            if low < info.min or high > info.max:
                raise FeatureConfigError(f"{where}: values in [{low}, {high}] do not fit {dt} [{info.min}, {info.max}]")
        if value.ndim not in (1, 2) or value.shape[0] == 0 or value.size == 0:
            raise FeatureConfigError(f"{where} has shape {value.shape!r}; expected (num_frames,) or "
                                     "(num_frames, dims) with num_frames > 0 and dims > 0")
        with np.errstate(over="ignore"):  # a float overflow becomes inf, refused just below
            array = np.ascontiguousarray(value.astype(dt, copy=False))
        if dt.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise FeatureConfigError(f"{where} holds {bad} non-finite values (as {dt})")
        checked[name] = array
    return checked


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Frontend:
    """Base class of every feature frontend.

    A frontend turns mono audio into a time-first feature matrix ``float32 (num_frames,
    feature_dim)``. Subclasses implement :meth:`config_dict`, :meth:`num_frames` and
    :meth:`batch`; the base class supplies the cache key, resampling, input checks and
    :meth:`__call__`.

    A frontend with named :attr:`outputs` returns ``{name: array}`` instead (from
    :meth:`__call__` and, per utterance, :meth:`batch`), each array of its declared dtype and
    keyed by :meth:`output_hash`.

    Frontend objects hold only plain config values (windows and filterbanks are cached at module
    level), so they pickle cheaply for worker processes.

    Attributes:
        name: registry name (``"squeezeformer"``, ``"zipformer"``, ``"w2v-bert"``, ...).
        feature_dim: number of feature columns per frame.
        sample_rate: rate in Hz the frontend works at; other rates are resampled (soxr).
        min_num_samples: smallest input, in samples at ``sample_rate``, that yields at least one
            frame (0 if any length, even empty, does).
        outputs: named outputs ``{name: numpy dtype name}`` in order (the first gives the
            ``frames`` statistic), or None: one ``float32 (num_frames, feature_dim)`` output.
    """

    name: str = "frontend"
    feature_dim: int = 0
    sample_rate: int = 16000
    min_num_samples: int = 0
    outputs: dict[str, str] | None = None

    # -- cache key ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """Return the keyed config, in its significant (upstream) key order."""
        raise NotImplementedError

    def config_repr(self) -> str:
        """Return ``repr({"featurizer": config_dict()})`` rendered as upstream (spec 3.2)."""
        return render_config_repr(self.config_dict())

    def frontend_hash(self) -> str:
        """Return the 12-hex-digit frontend hash ``sha256(config_repr())[:12]``."""
        return hash12(self.config_repr())

    def check_output(self, output: str | None) -> str | None:
        """Validate an output selection: None for a single-output frontend, a declared name
        for one with :attr:`outputs`; returns it.

        Raises:
            FeatureConfigError: None for a multi-output frontend, a name for a single-output
                one, or an undeclared name (the message lists the outputs).
        """
        if self.outputs is None:
            if output is not None:
                raise FeatureConfigError(f"frontend {self.name!r} has a single output (float32 features); "
                                         f"it has no output {output!r}: pass output=None")
            return None
        if output is None:
            raise FeatureConfigError(f"frontend {self.name!r} has named outputs {list(self.outputs)}; "
                                     "pick one with output=<name>")
        if output not in self.outputs:
            raise FeatureConfigError(f"frontend {self.name!r} has no output {output!r}; its outputs are "
                                     f"{list(self.outputs)}")
        return output

    def output_config_dict(self, output: str) -> dict:
        """The keyed config of a named output: ``{**config_dict(), "output": output}``."""
        self.check_output(output)
        return {**self.config_dict(), "output": output}

    def output_hash(self, output: str | None = None) -> str:
        """12-hex-digit hash of a named output,
        ``sha256(repr({"featurizer": {**config_dict(), "output": output}}))[:12]``; with
        ``output=None`` on a single-output frontend, :meth:`frontend_hash`.

        Raises:
            FeatureConfigError: see :meth:`check_output`.
        """
        if self.check_output(output) is None:
            return self.frontend_hash()
        return hash12(render_config_repr(self.output_config_dict(output)))

    def output_hashes(self) -> dict[str | None, str]:
        """``{output name: hash12}`` of every output, in declared order; ``{None:
        frontend_hash()}`` for a single-output frontend."""
        if self.outputs is None:
            return {None: self.frontend_hash()}
        return {name: self.output_hash(name) for name in self.outputs}

    def check_outputs(self, result: Any) -> dict[str, np.ndarray]:
        """:func:`check_named_outputs` of one utterance's result against :attr:`outputs`."""
        if self.outputs is None:
            raise FeatureConfigError(f"frontend {self.name!r} has no named outputs")
        return check_named_outputs(self.name, self.outputs, result)

    # -- frame counts ------------------------------------------------------------------------
    def num_frames(self, num_samples_16k: int) -> int:
        """Exact number of output rows for ``num_samples_16k`` samples at :attr:`sample_rate`."""
        raise NotImplementedError

    def estimate_num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Frame estimate from a sample count at any rate (spec 4.5); defaults to exact."""
        if num_samples <= 0 or sample_rate <= 0:
            return 0
        return self.num_frames(effective_num_samples(num_samples, sample_rate, self.sample_rate))

    # -- computation -------------------------------------------------------------------------
    def batch(self, samples_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Compute features for several utterances already at :attr:`sample_rate`.

        Args:
            samples_16k: mono utterances, each ``float32 (num_samples,)`` in [-1, 1] at
                :attr:`sample_rate` Hz.

        Returns:
            One ``float32 (num_frames, feature_dim)`` array per utterance, in input order.
        """
        raise NotImplementedError

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Compute features for one utterance at any sample rate.

        Args:
            samples: ``float (num_samples,)`` mono, or ``float (num_channels, num_samples)``
                (channels are averaged, as upstream), amplitude in [-1, 1].
            sample_rate: rate of ``samples`` in Hz; resampled with soxr to :attr:`sample_rate`
                when different.

        Returns:
            ``float32 (num_frames, feature_dim)`` features; for a frontend with named
            :attr:`outputs`, ``{name: array of its dtype, (num_frames, ...)}``.

        Raises:
            TypeError: ``samples`` is not a floating-point array.
            FeatureConfigError: bad shape or rate, or fewer than :attr:`min_num_samples` samples
                after resampling.
        """
        x = self.prepare(samples, sample_rate)
        self.check_length(x.shape[0])
        return self.batch([x])[0]

    def prepare(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Down-mix to mono, cast to float32 and resample to :attr:`sample_rate`.

        Args:
            samples: ``float (num_samples,)`` or ``float (num_channels, num_samples)``.
            sample_rate: rate of ``samples`` in Hz.

        Returns:
            ``float32 (num_samples_out,)`` at :attr:`sample_rate` Hz.
        """
        return to_mono_float32(samples, sample_rate, self.sample_rate)

    def check_length(self, num_samples: int) -> None:
        """Raise :class:`FeatureConfigError` if ``num_samples`` gives no frame."""
        if num_samples < self.min_num_samples:
            raise FeatureConfigError(
                f"frontend {self.name!r} needs at least {self.min_num_samples} samples at "
                f"{self.sample_rate} Hz to produce one frame, got {num_samples}; "
                "skip or pad such utterances before computing features"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.name == other.name  # type: ignore[attr-defined]
            and self.config_repr() == other.config_repr()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name, self.config_repr()))


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def effective_num_samples(num_samples: int, sample_rate: int, target_rate: int) -> int:
    """Sample count after resampling: ``max(1, ceil(n * target / sr))`` if rates differ.

    This is the output length of ``asr_assets.audio.resample`` and of upstream rubato.
    """
    n = int(num_samples)
    if sample_rate != target_rate:
        n = max(1, -(-n * int(target_rate) // int(sample_rate)))
    return n


def to_mono_float32(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Validate audio, average channels and resample to ``target_rate``.

    Args:
        samples: ``float (num_samples,)`` or ``float (num_channels, num_samples)`` in [-1, 1].
        sample_rate: rate of ``samples`` in Hz (> 0).
        target_rate: rate in Hz to return.

    Returns:
        ``float32 (num_samples_out,)``, C-contiguous.
    """
    x = np.asarray(samples)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"samples must be a floating-point array in [-1, 1], got dtype {x.dtype}; "
            "convert integer PCM first (e.g. int16 / 32768)"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(f"sample_rate must be an int (Hz), got {sample_rate!r}")
    if sample_rate <= 0:
        raise FeatureConfigError(f"sample_rate must be > 0 Hz, got {sample_rate!r}")
    if x.ndim == 2:
        x = x.mean(axis=0, dtype=np.float64)
    elif x.ndim != 1:
        raise FeatureConfigError(
            f"samples must be 1-D (num_samples,) or 2-D (num_channels, num_samples), "
            f"got shape {x.shape!r}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sample_rate != target_rate and x.shape[0] > 0:
        from asr_assets.audio import resample  # lazy: audio.py pulls in decoders

        x = np.ascontiguousarray(resample(x, int(sample_rate), int(target_rate)), dtype=np.float32)
    return x


_SCRATCH = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-thread work buffer reused across calls (uninitialized content).

    Reusing the block buffers avoids fresh pages (one page fault per 4 KiB) on every call, which
    cost ~15 % of a 10 s utterance's time. Buffers are never returned to callers; they stay
    allocated for the life of the thread (a few MB at most).

    Args:
        tag: buffer name, unique per use site.
        shape: required shape.
        dtype: required dtype.

    Returns:
        An array of exactly ``shape`` and ``dtype`` (a view of a possibly larger buffer).
    """
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    dt = np.dtype(dtype)
    buf = cache.get((tag, dt))
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dt)
        cache[(tag, dt)] = buf
    return buf[:size].reshape(shape)


def frame_chunks(lengths: Sequence[int], chunk: int = CHUNK_FRAMES):
    """Split frames of several utterances into blocks of at most ``chunk`` frames.

    Args:
        lengths: number of frames of each utterance.
        chunk: frames per block.

    Yields:
        Lists of ``(utterance_index, first_frame, num_frames, row_in_block)`` segments whose
        ``num_frames`` add up to at most ``chunk``.
    """
    block: list[tuple[int, int, int, int]] = []
    fill = 0
    for index, total in enumerate(lengths):
        start = 0
        while start < total:
            take = min(total - start, chunk - fill)
            block.append((index, start, take, fill))
            fill += take
            start += take
            if fill == chunk:
                yield block
                block, fill = [], 0
    if block:
        yield block


def exact_dot_f32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """The float32 nearest (ties to even) to the exact ``sum(a * b)`` of float64 vectors.

    :func:`math.fsum` gives the float64 nearest the exact sum of the (float64-rounded)
    products; rounding that to float32 is exact unless it sits on a float32 midpoint, where
    the exact sum decides (:class:`fractions.Fraction`). For float32-valued inputs every product
    is exact in float64, so the result is the correctly rounded dot product.

    Args:
        a: ``float64 (n,)``.
        b: ``float64 (n,)``.

    Returns:
        ``float32`` scalar; non-finite input gives a non-finite result.
    """
    products = a * b
    total = math.fsum(products)
    rounded = np.float32(total)
    if not math.isfinite(total) or float(rounded) == total:
        return rounded
    below = rounded if float(rounded) < total else np.nextafter(rounded, np.float32(-np.inf))
    above = np.nextafter(below, np.float32(np.inf))
    midpoint = (float(below) + float(above)) / 2  # exact: 25 significant bits
    if total != midpoint:
        return rounded
    exact = sum((Fraction(float(x)) for x in products), Fraction(0))
    if exact == Fraction(midpoint):
        return rounded  # a true tie: ties to even, as the float32 cast did
    return above if exact > Fraction(midpoint) else below


class MelBands:
    """A mel filterbank split into column groups over their non-zero bin ranges.

    Mel triangles are sparse (each FFT bin feeds at most two bands), so the mel projection is
    done as a few small GEMMs, one per group of adjacent bands restricted to the bins they
    touch: about a quarter of the dense FLOPs for 80 bands, with one BLAS call per group.

    **The result does not depend on the BLAS.** A GEMM's rounding depends on the kernel
    (OpenBLAS Haswell/Zen vs SkylakeX vs SandyBridge), the thread count, the number of rows
    and even a row's position in the block: on Haswell one frame differs by up to 5e-5
    relative between two positions of a 256-row GEMM. :meth:`power_mel` therefore returns,
    for every element, the float32 nearest to the *exact* sum ``sum_k p_k w_k`` of the float32
    power spectrum ``p_k = re_k^2 + im_k^2`` (float32 arithmetic) and float32 weights, one
    number whatever the BLAS does:

    1. The GEMM runs in float64. A product of two float32 values is exact there and all terms
       are non-negative, so any summation order and any FMA use stay within
       ``g = (K + 4) 2^-52`` relative of the exact sum of K terms (Higham, *Accuracy and
       Stability of Numerical Algorithms*, 2nd ed., section 3.1).
    2. Where ``v (1 - g)`` and ``v (1 + g)`` round to the same float32, the exact sum, which
       lies between them, rounds to it too (rounding is monotonic): that is ``float32(v)``.
       This is tested on the bits of ``v``: the 29 significand bits that float32 drops must
       not lie within ``g 2^53 + 1`` float64 ulps of their midpoint.
    3. The few others (about 2 in a million elements) are recomputed exactly
       (:func:`exact_dot_f32`), which is independent of order as well.

    So ``batch([a, b]) == [f(a), f(b)]`` bit for bit on every kernel and thread count
    (``asr_assets_tests/test_frontends.py``), for the price of a float64 GEMM.

    Args:
        fbank: ``float (num_bins, num_mels)`` non-negative filterbank weights (used as float32).
        group: bands per GEMM.

    Raises:
        ValueError: a negative weight (the error bound needs non-negative terms).
    """

    def __init__(self, fbank: np.ndarray, group: int = 16):
        fbank = np.asarray(fbank, dtype=np.float64)
        if not np.all(fbank >= 0):
            raise ValueError("mel filterbank weights must be non-negative")
        self.num_bins, self.num_mels = fbank.shape
        weights32 = fbank.astype(np.float32).astype(np.float64)  # the frontend's float32 weights
        nonzero = weights32 > 0
        lo = np.where(nonzero.any(0), nonzero.argmax(0), 0)
        hi = np.where(nonzero.any(0), self.num_bins - nonzero[::-1].argmax(0), 0)
        self.groups: list[tuple[int, int, int, int, np.ndarray]] = []
        #: per band: ``(first bin, weights over the bins of its group)``, for the exact fallback
        self._band_weights: list[tuple[int, np.ndarray]] = []
        widest = 1
        for c0 in range(0, self.num_mels, group):
            c1 = min(self.num_mels, c0 + group)
            b0, b1 = int(lo[c0:c1].min()), int(hi[c0:c1].max())
            b1 = max(b1, b0 + 1)
            weights = np.ascontiguousarray(weights32[b0:b1, c0:c1])
            self.groups.append((c0, c1, b0, b1, weights))
            self._band_weights.extend((b0, weights[:, j].copy()) for j in range(c1 - c0))
            widest = max(widest, b1 - b0)
        #: relative error bound g of any float64 summation order of `widest` terms, and the
        #: same in float64 ulps of the result's binade (rounded up, +1)
        self._rel_bound = (widest + 4) * 2.0**-52
        self._ulps = int(math.ceil(self._rel_bound * 2.0**53)) + 1

    def power_mel(self, spec: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Mel energies ``|spec|^2 @ fbank``, each the float32 nearest its exact value.

        Args:
            spec: ``complex64 (num_frames, num_bins)`` spectrum; overwritten (squared in place).
            out: ``float32 (num_frames, num_mels)`` destination.

        Returns:
            ``out``: mel power (signal units squared). Non-finite input gives non-finite output.
        """
        rows = spec.shape[0]
        sq = spec.view(np.float32)
        np.square(sq, out=sq)
        power = scratch("melbands.power", (rows, self.num_bins), np.float64)
        # float32 re^2 + im^2 (element-wise, so the same bits in any batch), held in float64
        np.add(spec.real, spec.imag, out=power, dtype=np.float32, casting="same_kind")
        acc = scratch("melbands.acc", (rows, self.num_mels), np.float64)
        for c0, c1, b0, b1, weights in self.groups:
            np.matmul(power[:, b0:b1], weights, out=acc[:, c0:c1])
        np.copyto(out, acc, casting="same_kind")
        # Certify the rounding on the bits of each float64 result v: rounding to float32 keeps
        # 24 of 53 significand bits, so it is decided by the low 29 bits, midpoint 2^28. With
        # |v - exact| <= g v < g 2^53 float64 ulps, the exact sum rounds like v unless those
        # bits are within D = g 2^53 + 1 of the midpoint: (low29 - (2^28 - D)) mod 2^29 <= 2D.
        bits = acc.view(np.uint64)
        dist = scratch("melbands.dist", (rows, self.num_mels), np.uint64)
        np.subtract(bits, np.uint64(2**28 - self._ulps), out=dist)
        np.bitwise_and(dist, np.uint64(2**29 - 1), out=dist)
        uncertain = np.less_equal(dist, np.uint64(2 * self._ulps))
        if rows and acc.min() < _F32_MIN_NORMAL:  # float32 subnormals have a coarser grid
            uncertain |= (acc > 0) & (acc < _F32_MIN_NORMAL)
        if uncertain.any():
            for i, m in zip(*np.nonzero(uncertain)):
                if not math.isfinite(acc[i, m]):
                    continue
                b0, w = self._band_weights[m]
                out[i, m] = exact_dot_f32(power[i, b0 : b0 + w.shape[0]], w)
        return out


def normalize_columns(
    features: np.ndarray,
    *,
    ddof: int,
    std_floor: float = 0.0,
    var_offset: float = 0.0,
    std_offset: float = 0.0,
    axis: int = 0,
) -> np.ndarray:
    """Standardize each column (``axis=0``) or row (``axis=1``) in place.

    Computes ``(x - mean) / (max(sqrt(var_ddof + var_offset), std_floor) + std_offset)``
    (torchaudio/HF/Ludwig conventions: squeezeformer uses ``ddof=0, std_floor=1e-5``, w2v-bert
    ``ddof=1, var_offset=1e-7``, Ludwig ``per_file`` ``ddof=1, std_offset=1e-10``). The mean
    is accumulated in float64. With fewer than ``ddof + 1`` values the variance is taken as 0
    (upstream Rust divisor 1; HF gives NaN).

    Constant-column rule: a column whose standard deviation is at most
    :data:`CONSTANT_COLUMN_ULPS` float32 ulps of its mean (``std <= 8 * eps32 * |mean|``,
    i.e. about 1e-6 relative) is constant up to float32 rounding and is set to exactly 0.
    Such columns occur in band-limited audio (mel bands above 4 kHz of 8 kHz sources upsampled
    to 16 kHz all sit at the log floor). An exactly constant column is 0 in exact arithmetic;
    torch's float32 mean of identical values can be off by an ulp, which its 1e-5 std floor
    turns into a spurious constant (0.095 seen on such a column); this rule returns 0.

    Args:
        features: ``float32 (num_frames, num_features)``, modified in place.
        ddof: delta degrees of freedom of the variance.
        std_floor: lower clamp of the standard deviation.
        var_offset: constant added to the variance before the square root.
        std_offset: constant added to the (clamped) standard deviation.
        axis: 0 normalizes each column over time, 1 each row over features.

    Returns:
        ``features`` (the same array), normalized.
    """
    if features.size == 0:
        return features
    x = features if axis == 0 else features.T
    n = x.shape[0]
    mean = x.sum(axis=0, dtype=np.float64) / n
    np.subtract(x, mean.astype(np.float32), out=x)
    ss = np.einsum("ij,ij->j", x, x).astype(np.float64)
    var = ss / (n - ddof) if n > ddof else np.zeros_like(ss)
    std = np.sqrt(var + var_offset)
    constant = np.sqrt(var) <= CONSTANT_COLUMN_ULPS * _EPS32 * np.abs(mean)
    scale = np.where(constant, 0.0, 1.0 / (np.maximum(std, std_floor) + std_offset))
    scale = scale.astype(np.float32)
    np.multiply(x, scale, out=x)
    return features


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as int if it is a positive integer, else raise FeatureConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise FeatureConfigError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise FeatureConfigError."""
    if not isinstance(value, (bool, np.bool_)):
        raise FeatureConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    """Return ``value`` as float if it is a finite real in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FeatureConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        raise FeatureConfigError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return v
