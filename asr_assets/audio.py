"""Audio decoding and resampling to mono float32.

Public entry points:
    TARGET_SAMPLE_RATE: the frontend rate, 16000 Hz.
    DecodeConfig: decoder options (FFmpeg fallback, duration cap, soxr quality).
    decode_audio(source, *, hint, config) -> (samples, sample_rate) at the stream's own rate.
    resample(samples, sample_rate, target_rate, quality) -> samples of length ceil(n*dst/src).
    load_audio(source, *, hint, config, target_rate) -> samples at ``target_rate``.
    probe_duration(source, *, hint) -> seconds, from the header only.

Decoding tries, in order (compatible with upstream spec section 4.1, see the notes per backend):
    1. soundfile (libsndfile): WAV/W64/RF64, FLAC, Ogg/Vorbis, Ogg/Opus, MP3, AIFF, AU, CAF, and
       headerless ``.raw``/``.pcm`` files (read as s16le 16 kHz mono; libsndfile cannot sniff
       headerless PCM, so the extension of the path or ``hint`` decides).
    2. Ogg/Opus repair: a stream whose OpusTags packet is missing is repaired in memory
       (:mod:`asr_assets._ogg_opus`) and decoded again with soundfile (then PyAV).
    3. PyAV (FFmpeg libraries, in-process; no ffmpeg executable is ever spawned): M4A/AAC,
       Matroska/WebM, Ogg-FLAC and anything else FFmpeg reads. Disabled by
       ``DecodeConfig(ffmpeg_fallback=False)``.
Unlike the upstream Rust FFmpeg path, PyAV output is *not* resampled here: every backend returns
the stream's native rate (Opus: soundfile gives the encoder's original rate, PyAV 48 kHz).

Partial data policy: when a stream is damaged part-way (truncated FLAC "lost sync", truncated
MP3, a WAV header that claims more data than the file holds) the frames decoded before the
damage are kept, as long as at least one frame decoded. A truncated recording is still mostly
good speech; the record-level duration filters downstream decide whether to use it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import soundfile as sf
import soxr

from asr_assets._ogg_opus import OggRepairError, looks_like_ogg_opus, repair_missing_opustags
from asr_assets.errors import AudioDecodeError

__all__ = [
    "TARGET_SAMPLE_RATE",
    "DecodeConfig",
    "decode_audio",
    "resample",
    "load_audio",
    "probe_duration",
]

TARGET_SAMPLE_RATE = 16000

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_BLOCK_FRAMES = 1 << 16  # soundfile read block (frames)
_RAW_EXTENSIONS = {".raw", ".pcm"}
_RAW_KWARGS = {"format": "RAW", "subtype": "PCM_16", "endian": "LITTLE", "samplerate": 16000,
               "channels": 1}
_SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True)
class DecodeConfig:
    """Options of :func:`decode_audio`.

    Attributes:
        ffmpeg_fallback: allow the PyAV (in-process FFmpeg libraries) backend after soundfile.
        max_duration_s: if set, audio longer than this many seconds raises AudioDecodeError.
            Decoding stops as soon as the cap is exceeded, so at most about ``max_duration_s``
            seconds of samples (plus one block/frame) are ever held in memory.
        resample_quality: soxr quality string (``"VHQ"``, ``"HQ"``, ``"MQ"``, ``"LQ"``, ``"QQ"``).
    """

    ffmpeg_fallback: bool = True
    max_duration_s: float | None = None
    resample_quality: str = "HQ"


class _Fatal(Exception):
    """A definitive verdict (e.g. too long) that must not fall through to other backends."""


class _TooLong(_Fatal):
    pass


def _describe(source: Source, hint: str | None) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes {hint}>" if hint else "<bytes>"
    return os.fspath(source)


def _extension(source: Source, hint: str | None) -> str:
    if hint:
        return os.path.splitext(str(hint))[1].lower()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ""
    return os.path.splitext(os.fspath(source))[1].lower()


def _as_file(source: Source):
    """A path string or a fresh BytesIO over the bytes (soundfile and PyAV accept both)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return os.fspath(source)


def _read_head(source: Source, n: int = _SNIFF_BYTES) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:n])
    with open(os.fspath(source), "rb") as fh:
        return fh.read(n)


def _max_frames(sample_rate: int, max_duration_s: float | None) -> int | None:
    return None if max_duration_s is None else int(math.floor(max_duration_s * sample_rate))


def _check_rate_channels(sample_rate: int, channels: int) -> None:
    if channels <= 0:
        raise ValueError(f"zero channels ({channels})")
    if sample_rate <= 0:
        raise ValueError(f"invalid sample rate {sample_rate}")


def _finish(blocks: list[np.ndarray], sample_rate: int) -> tuple[np.ndarray, int]:
    samples = np.concatenate(blocks).astype(np.float32, copy=False) if blocks else None
    if samples is None or samples.size == 0:
        raise ValueError("no samples")
    return samples, sample_rate


def _decode_soundfile(source: Source, ext: str, config: DecodeConfig) -> tuple[np.ndarray, int]:
    kwargs = _RAW_KWARGS if ext in _RAW_EXTENSIONS else {}
    with sf.SoundFile(_as_file(source), mode="r", **kwargs) as f:
        sample_rate, channels = int(f.samplerate), int(f.channels)
        _check_rate_channels(sample_rate, channels)
        limit = _max_frames(sample_rate, config.max_duration_s)
        blocks: list[np.ndarray] = []
        total = 0
        buf = np.empty((_BLOCK_FRAMES, channels), dtype=np.float32)
        while True:
            damaged = False
            try:
                n = f.read(frames=_BLOCK_FRAMES, dtype="float32", always_2d=True, out=buf).shape[0]
            except (sf.LibsndfileError, RuntimeError):
                # Damaged stream (e.g. truncated FLAC "lost sync"): libsndfile raises after
                # filling part of ``buf``; its position tells how many frames are valid.
                try:
                    n = min(max(f.tell() - total, 0), _BLOCK_FRAMES)
                except Exception:  # noqa: BLE001
                    n = 0
                if total + n == 0:
                    raise
                damaged = True
            if n == 0:
                break
            block = buf[:n]
            blocks.append(block[:, 0].copy() if channels == 1 else block.mean(axis=1))
            total += n
            if limit is not None and total > limit:
                raise _TooLong(f"longer than max_duration_s={config.max_duration_s} s")
            if damaged:
                break
    return _finish(blocks, sample_rate)


def _frame_to_mono(frame) -> np.ndarray:
    """One PyAV AudioFrame -> float32 mono, planar or packed, int or float formats."""
    arr = frame.to_ndarray()
    channels = max(1, len(frame.layout.channels))
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T  # packed: (1, n*ch) interleaved -> (ch, n)
    if arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(-np.iinfo(arr.dtype).min)
    else:
        arr = arr.astype(np.float32, copy=False)
    return arr[0].copy() if arr.shape[0] == 1 else arr.mean(axis=0)


def _decode_pyav(source: Source, config: DecodeConfig) -> tuple[np.ndarray, int]:
    import av  # imported lazily: only needed for the fallback

    with av.open(_as_file(source), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        sample_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        blocks: list[np.ndarray] = []
        total = 0
        limit = None
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if not blocks:
                    sample_rate = int(frame.sample_rate or sample_rate)
                    _check_rate_channels(sample_rate, len(frame.layout.channels))
                    limit = _max_frames(sample_rate, config.max_duration_s)
                blocks.append(_frame_to_mono(frame))
                total += frame.samples
                if limit is not None and total > limit:
                    raise _TooLong(f"longer than max_duration_s={config.max_duration_s} s")
        except av.error.FFmpegError:
            if total == 0:
                raise
            # damaged tail: keep the frames decoded so far (see module docstring)
    return _finish(blocks, sample_rate)


def _decode_repaired_opus(source: Source, config: DecodeConfig) -> tuple[np.ndarray, int]:
    if not looks_like_ogg_opus(_read_head(source)):
        raise OggRepairError("not an Ogg/Opus stream")
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else \
        _read_file(source)
    repaired = repair_missing_opustags(data)
    try:
        return _decode_soundfile(repaired, ".opus", config)
    except _Fatal:
        raise
    except Exception as exc:
        if not config.ffmpeg_fallback:
            raise
        try:
            return _decode_pyav(repaired, config)
        except _Fatal:
            raise
        except Exception as exc2:
            raise ValueError(f"soundfile: {_msg(exc)}; pyav: {_msg(exc2)}") from exc2


def _read_file(source: Source) -> bytes:
    with open(os.fspath(source), "rb") as fh:
        return fh.read()


def _msg(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text


def decode_audio(
    source: Source,
    *,
    hint: str | None = None,
    config: DecodeConfig = DecodeConfig(),
) -> tuple[np.ndarray, int]:
    """Decode a file or in-memory container to mono float32 samples at the stream's own rate.

    Backends are tried in order: soundfile, Ogg/Opus OpusTags repair, PyAV (if
    ``config.ffmpeg_fallback``); see the module docstring. Channels are averaged to mono.

    Args:
        source: a path (``str``/``os.PathLike``) or the raw container bytes.
        hint: file name or extension for bytes input (e.g. the manifest's audio path); only its
            extension is used (``.raw``/``.pcm`` selects headerless s16le 16 kHz mono). For a path
            source a hint overrides the path's own extension.
        config: decoder options.

    Returns:
        ``(samples, sample_rate)``: ``samples`` is a float32 array of shape ``(n,)``, n >= 1,
        nominally in [-1, 1] (integer PCM is scaled by 1/2**(bits-1); float sources are passed
        through unclipped); ``sample_rate`` is in Hz (> 0).

    Raises:
        AudioDecodeError: every backend failed (the message names the source and each backend's
            failure; chained from the last exception), or the stream has 0 samples, a sample rate
            <= 0 or zero channels, contains NaN/Inf samples (the reason gives the count), or is
            longer than ``config.max_duration_s``.
    """
    name = _describe(source, hint)
    ext = _extension(source, hint)
    backends: list[tuple[str, Callable[[], tuple[np.ndarray, int]]]] = [
        ("soundfile", lambda: _decode_soundfile(source, ext, config)),
        ("ogg-opus-repair", lambda: _decode_repaired_opus(source, config)),
    ]
    if config.ffmpeg_fallback:
        backends.append(("pyav", lambda: _decode_pyav(source, config)))

    failures: list[str] = []
    last_exc: BaseException | None = None
    result = None
    for backend, run in backends:
        try:
            result = run()
            break
        except _Fatal as exc:
            raise AudioDecodeError(name, f"{backend}: {_msg(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - every backend failure is reported
            failures.append(f"{backend}: {_msg(exc)}")
            last_exc = exc
    if result is None:
        if not config.ffmpeg_fallback:
            failures.append("pyav: disabled (ffmpeg_fallback=False)")
        raise AudioDecodeError(name, "; ".join(failures)) from last_exc

    samples, sample_rate = result
    bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
    if bad:
        raise AudioDecodeError(
            name, f"{bad} of {samples.size} samples are non-finite (NaN/Inf)")
    return samples, sample_rate


def resample(
    samples: np.ndarray,
    sample_rate: int,
    target_rate: int = TARGET_SAMPLE_RATE,
    quality: str = "HQ",
) -> np.ndarray:
    """Resample mono audio with soxr to an exact output length.

    Args:
        samples: 1-D array of shape ``(n,)`` (any real dtype; converted to float32).
        sample_rate: input rate in Hz (> 0).
        target_rate: output rate in Hz (> 0).
        quality: soxr quality string.

    Returns:
        float32 array of shape ``(ceil(n * target_rate / sample_rate),)``; soxr's output is
        trimmed or zero-padded to that length (as rubato's ``process_all_into_buffer`` upstream;
        4800 samples at 48 kHz -> 1600 at 16 kHz). Equal rates or empty input are returned
        unchanged (as float32).

    Raises:
        ValueError: ``samples`` is not 1-D or a rate is not positive.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects 1-D samples, got shape {x.shape}")
    sample_rate, target_rate = int(sample_rate), int(target_rate)
    if sample_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {sample_rate} -> {target_rate}")
    if sample_rate == target_rate or x.size == 0:
        return x
    n_out = -(-x.size * target_rate // sample_rate)  # exact integer ceil
    y = soxr.resample(x, sample_rate, target_rate, quality=quality)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if y.size >= n_out:
        return np.ascontiguousarray(y[:n_out])
    out = np.zeros(n_out, dtype=np.float32)
    out[: y.size] = y
    return out


def load_audio(
    source: Source,
    *,
    hint: str | None = None,
    config: DecodeConfig = DecodeConfig(),
    target_rate: int = TARGET_SAMPLE_RATE,
) -> np.ndarray:
    """Decode (:func:`decode_audio`) and resample (:func:`resample`) to ``target_rate``.

    Returns:
        float32 array of shape ``(n,)`` at ``target_rate`` Hz, nominally in [-1, 1].

    Raises:
        AudioDecodeError: as :func:`decode_audio`.
    """
    samples, sample_rate = decode_audio(source, hint=hint, config=config)
    return resample(samples, sample_rate, target_rate, quality=config.resample_quality)


def _probe_soundfile(source: Source, ext: str) -> float:
    if ext in _RAW_EXTENSIONS:
        size = len(source) if isinstance(source, (bytes, bytearray, memoryview)) else \
            os.path.getsize(os.fspath(source))
        return size // 2 / _RAW_KWARGS["samplerate"]
    info = sf.info(_as_file(source))
    if info.samplerate <= 0 or info.channels <= 0 or info.frames <= 0:
        raise ValueError(f"header gives frames={info.frames}, rate={info.samplerate}")
    return info.frames / info.samplerate


def _probe_pyav(source: Source) -> float:
    import av

    with av.open(_as_file(source), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        _check_rate_channels(int(stream.codec_context.sample_rate or stream.rate or 0),
                             int(stream.codec_context.channels or 0))
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / av.time_base
        raise ValueError("container gives no duration")


def probe_duration(source: Source, *, hint: str | None = None) -> float:
    """Duration in seconds read from the header, without decoding the audio.

    Tries ``soundfile.info`` (for ``.raw``/``.pcm``: file size / 2 bytes / 16 kHz), then the same
    on an OpusTags-repaired copy of an Ogg/Opus stream, then PyAV's stream/container duration.
    The header may over-claim for damaged files (e.g. a truncated MP3 with a Xing header).

    Args:
        source: a path or the raw container bytes.
        hint: file name/extension hint for bytes input.

    Returns:
        Duration in seconds (float, > 0).

    Raises:
        AudioDecodeError: no backend can tell the duration.
    """
    ext = _extension(source, hint)
    failures: list[str] = []
    last_exc: BaseException | None = None

    def repaired() -> float:
        if not looks_like_ogg_opus(_read_head(source)):
            raise OggRepairError("not an Ogg/Opus stream")
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else \
            _read_file(source)
        return _probe_soundfile(repair_missing_opustags(data), ".opus")

    for backend, run in (("soundfile", lambda: _probe_soundfile(source, ext)),
                         ("ogg-opus-repair", repaired),
                         ("pyav", lambda: _probe_pyav(source))):
        try:
            duration = float(run())
            if duration > 0 and math.isfinite(duration):
                return duration
            raise ValueError(f"non-positive duration {duration}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{backend}: {_msg(exc)}")
            last_exc = exc
    raise AudioDecodeError(_describe(source, hint), "; ".join(failures)) from last_exc
