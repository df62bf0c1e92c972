"""Gapless, sample-exact decoding: ``asr_assets.audio`` against the ``ffmpeg`` command-line tool.

The ffmpeg tool is the reference here and only here (the project never runs it): every file of the
test data's ``formats/audio`` (the in-repo subset, plus the files of ``$ASR_ASSETS_TEST_DATA``'s
when that is set, e.g. the full set) is decoded by ``ffmpeg -i FILE -map 0:a:0 -f f32le -`` at its
native rate and channel count, the channels averaged as :func:`decode_audio` does. Compared with
it, per file: the length, the best cross-correlation lag (positive: our decode has that many
extra samples at the start) and the largest difference of the aligned samples.

* :func:`decode_audio` on every file whose decode it hands to PyAV (M4A/AAC, WebM/Opus, MKA/FLAC,
  Ogg-FLAC): the same length and lag 0, samples within 1e-4 (same libavcodec decoders).
* The PyAV backend alone (what remote audio and every fallback use) on every file FFmpeg can
  open: the same.
* The libsndfile files: lag 0, the same length, samples close (other decoders: mpg123, libvorbis,
  libopus; Opus at the encoder's rate against ffmpeg's resampled to it).
* WebM/Opus whose CodecDelay disagrees with the OpusHead pre-skip (the corpus file was muxed by
  FFmpeg 5.1 from 16 kHz input: CodecDelay 104, pre-skip 312; and variants patched to 0, 52, 312,
  480 samples): the pre-skip is what is dropped.

``ffmpeg`` and ``ffprobe`` must be on PATH (Debian/Ubuntu: ``apt-get install -y ffmpeg``); without
them every test here fails, naming what is missing. ``python -m asr_assets_tests.test_gapless``
prints the table of docs/decoders.md. Measured with ffmpeg 5.1.9 (Debian 12), PyAV 18.1 /
FFmpeg 8, soundfile 0.14 / libsndfile 1.2.2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from asr_assets import audio
from asr_assets._ogg_opus import repair_missing_opustags
from asr_assets.audio import DecodeConfig, decode_audio

from asr_assets_tests.conftest import IN_REPO_DATA

APT_LINE = "apt-get update && apt-get install -y --no-install-recommends ffmpeg"
PYAV_TOLERANCE = 1e-4  # PyAV (FFmpeg 8) against the ffmpeg tool; measured <= 2.4e-7
WEBM = "jfk__webm_opus_16000_mono.webm"


def _corpus() -> dict[str, Path]:
    """Every file of the in-repo ``formats/audio``, plus the others of $ASR_ASSETS_TEST_DATA's."""
    dirs = [IN_REPO_DATA / "formats" / "audio"]
    extra = os.environ.get("ASR_ASSETS_TEST_DATA")
    if extra:
        dirs.append(Path(extra).resolve() / "formats" / "audio")
    files: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is missing (see asr_assets_tests/data/README.md)")
        for p in sorted(d.iterdir()):
            files.setdefault(p.name, p)
    return files


CORPUS = _corpus()


# --------------------------------------------------------------------------- the reference

def _missing_tools() -> list[str]:
    return [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    """The ffmpeg version line; fails (never skips) every test that needs it when it is missing."""
    missing = _missing_tools()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found on PATH: the gapless tests compare with the "
                    f"ffmpeg command-line tool as the reference. Install it (Debian/Ubuntu: "
                    f"`{APT_LINE}`).", pytrace=False)
    return _ffmpeg_version()


def _ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def _ffmpeg_input(path: Path) -> tuple[list[str], bytes | None, tuple[int, int] | None]:
    """ffmpeg's input options, its stdin, and (channels, rate) when no header tells them."""
    if path.suffix in (".raw", ".pcm"):  # headerless: the format decode_audio assumes
        return ["-f", "s16le", "-ar", "16000", "-ac", "1", "-i", str(path)], None, (1, 16000)
    if "__opustags_remove" in path.name:  # FFmpeg rejects it as is: the stream with the repair
        return ["-i", "pipe:0"], repair_missing_opustags(path.read_bytes()), None
    return ["-i", str(path)], None, None


def ffmpeg_decode(path: Path, rate: int | None = None,
                  decoder: str | None = None) -> tuple[np.ndarray, int]:
    """The ffmpeg tool's decode of the first audio stream, channels averaged: (samples, rate).

    Native rate and channel count (``ffprobe``), unless ``rate`` asks ffmpeg to resample;
    ``decoder`` picks another decoder than FFmpeg's default (``-c:a libopus``)."""
    args, stdin, layout = _ffmpeg_input(path)
    if decoder:
        args = ["-c:a", decoder, *args]
    if layout is None:
        probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_streams",
                                "-of", "json", args[-1]], input=stdin, capture_output=True,
                               check=True).stdout
        stream = json.loads(probe)["streams"][0]
        layout = int(stream["channels"]), int(stream["sample_rate"])
    channels, native = layout
    resample = ["-ar", str(rate)] if rate and rate != native else []
    cmd = ["ffmpeg", "-hide_banner", "-v", "error", *args, "-map", "0:a:0", *resample,
           "-f", "f32le", "-c:a", "pcm_f32le", "-"]
    if stdin is None:
        cmd.insert(1, "-nostdin")
    raw = subprocess.run(cmd, input=stdin, capture_output=True, check=True).stdout
    x = np.frombuffer(raw, dtype=np.float32).reshape(-1, channels)
    return (x[:, 0].copy() if channels == 1 else x.mean(axis=1)), (rate or native)


# --------------------------------------------------------------------------- comparison

@dataclass(frozen=True)
class Comparison:
    n: int  # our samples
    n_ref: int  # ffmpeg's
    lag: int  # best lag: our sample lag + k is ffmpeg's sample k
    max_diff: float  # largest |difference| of the aligned samples

    @property
    def length_delta(self) -> int:
        return self.n - self.n_ref


def compare(x: np.ndarray, ref: np.ndarray, max_lag: int = 2048, window: int = 16384) -> Comparison:
    """Length, best lag in [-max_lag, max_lag] (cross-correlation of the loudest ``window``
    samples of ``ref``) and max |x - ref| over the aligned overlap."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    n = min(len(x), len(ref))
    window = min(window, max(1, n - 2 * max_lag - 1))
    starts = np.arange(max_lag, max(max_lag + 1, n - max_lag - window), window)
    energy = [float(np.dot(ref[s:s + window], ref[s:s + window])) for s in starts]
    s = int(starts[int(np.argmax(energy))])
    core = ref[s:s + window]
    seg = x[s - max_lag:s + window + max_lag]
    corr = np.correlate(seg, core, mode="valid")
    lag = int(np.argmax(corr)) - max_lag
    diff = _aligned_diff(x, ref, lag)
    return Comparison(len(x), len(ref), lag, float(np.max(np.abs(diff))) if diff.size else np.inf)


def _aligned_diff(x: np.ndarray, ref: np.ndarray, lag: int) -> np.ndarray:
    """``x[k + lag] - ref[k]`` over the overlap."""
    a = np.asarray(x, dtype=np.float64)[max(lag, 0):]
    b = np.asarray(ref, dtype=np.float64)[max(-lag, 0):]
    m = min(len(a), len(b))
    return a[:m] - b[:m]


@contextlib.contextmanager
def _spy():
    """Records which backend produced each ``_Decoded`` (matched by identity of its samples)."""
    made: list[tuple[str, np.ndarray]] = []
    names = {"_decode_repaired_opus": "libsndfile (OpusTags repaired)",
             "_decode_soundfile": "libsndfile", "_decode_pyav": "PyAV"}
    saved = {name: getattr(audio, name) for name in names}

    def wrap(name, fn):
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            made.append((names[name], result.samples))
            return result
        return run

    for name, fn in saved.items():
        setattr(audio, name, wrap(name, fn))
    try:
        yield made
    finally:
        for name, fn in saved.items():
            setattr(audio, name, fn)


_DECODED: dict[str, tuple[np.ndarray, int, str]] = {}


def decode_with_backend(path: Path) -> tuple[np.ndarray, int, str]:
    """:func:`decode_audio` and the name of the backend whose decode it returned (cached)."""
    if str(path) not in _DECODED:
        _DECODED[str(path)] = _decode_with_backend(path)
    return _DECODED[str(path)]


def _decode_with_backend(path: Path) -> tuple[np.ndarray, int, str]:
    with _spy() as made:
        samples, rate = decode_audio(path)
    # the outermost backend that returned these samples (the repair wraps a libsndfile decode)
    backend = next((name for name, s in reversed(made) if s is samples), "?")
    return samples, rate, backend


_REF_CACHE: dict[tuple[str, int, str], tuple[np.ndarray, int]] = {}


def reference(path: Path, rate: int | None = None,
              decoder: str | None = None) -> tuple[np.ndarray, int]:
    """:func:`ffmpeg_decode`, cached."""
    key = (str(path), rate or 0, decoder or "")
    if key not in _REF_CACHE:
        _REF_CACHE[key] = ffmpeg_decode(path, rate, decoder)
    return _REF_CACHE[key]


def libsndfile_reference(path: Path, rate: int) -> tuple[np.ndarray, int, str]:
    """The ffmpeg decode a libsndfile decode is compared with, and its name. Opus: FFmpeg's
    libopus wrapper (libsndfile decodes with libopus too; FFmpeg's own Opus decoder is another
    implementation, up to 2 samples off at 48 kHz), resampled by ffmpeg when libsndfile decodes
    at the encoder's lower rate."""
    if path.suffix == ".opus":
        ref, ref_rate = reference(path, rate, "libopus")
        return ref, ref_rate, "ffmpeg -c:a libopus" + (f" -ar {rate}" if rate != 48000 else "")
    return (*reference(path, rate), "ffmpeg")


def _check_exact(name: str, samples: np.ndarray, rate: int, ref: np.ndarray, ref_rate: int,
                 version: str, what: str) -> Comparison:
    c = compare(samples, ref)
    where = f"{name} ({what} against {version}): {c}"
    assert rate == ref_rate, where
    assert c.lag == 0, where
    assert c.length_delta == 0, where
    assert c.max_diff <= PYAV_TOLERANCE, where
    return c


# --------------------------------------------------------------------------- tests

PYAV_BACKEND_FILES = [name for name in CORPUS if not name.endswith((".raw", ".pcm"))
                      and "__opustags_remove" not in name]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decode_audio_matches_ffmpeg(name, ffmpeg):
    """decode_audio: PyAV-decoded files exactly as ffmpeg; libsndfile files aligned, same length."""
    path = CORPUS[name]
    samples, rate, backend = decode_with_backend(path)
    if backend == "PyAV":
        ref, ref_rate = reference(path)
        _check_exact(name, samples, rate, ref, ref_rate, ffmpeg, "decode_audio via PyAV")
        return
    assert backend.startswith("libsndfile"), (name, backend)
    ref, ref_rate, how = libsndfile_reference(path, rate)
    c = compare(samples, ref)
    where = f"{name} (decode_audio via {backend} against {ffmpeg}: {how}): {c}"
    assert rate == ref_rate and c.length_delta == 0, where
    if path.suffix == ".opus" and rate != 48000:  # libopus at 8-24 kHz against ffmpeg's resampling
        assert abs(c.lag) <= 1, where
        return
    assert c.lag == 0, where
    if path.suffix in (".opus", ".mp3", ".ogg"):  # libopus (s16 in ffmpeg), mpg123, libvorbis
        # measured <= 1.5e-5 (Opus), 3.9e-6 (MP3), 3.0e-7 (Vorbis), except 510 samples of
        # jfk__mp3_48000_stereo.mp3 (max 0.055): libsndfile read in 65,536-frame blocks differs
        # there from a whole-file read (which agrees with ffmpeg); a libsndfile/mpg123 matter
        far = int(np.count_nonzero(np.abs(_aligned_diff(samples, ref, c.lag)) > PYAV_TOLERANCE))
        assert far <= len(samples) // 200 and c.max_diff < 0.1, (where, far)
    else:  # PCM, FLAC and the like: the same samples
        assert c.max_diff <= 1e-6, where


@pytest.mark.parametrize("name", PYAV_BACKEND_FILES)
def test_pyav_backend_matches_ffmpeg(name, ffmpeg):
    """The PyAV backend on its own (remote audio, fallbacks): every file exactly as ffmpeg."""
    path = CORPUS[name]
    decoded = audio._decode_pyav(str(path), DecodeConfig())
    ref, ref_rate = reference(path)
    _check_exact(name, decoded.samples, decoded.sample_rate, ref, ref_rate, ffmpeg, "PyAV backend")


def test_pyav_decoded_formats_are_the_expected_ones():
    """The formats libsndfile cannot read are the ones decode_audio hands to PyAV."""
    pyav = sorted(name for name in CORPUS if decode_with_backend(CORPUS[name])[2] == "PyAV")
    assert {Path(n).suffix for n in pyav} == {".m4a", ".webm", ".mka", ".oga"}, pyav


def _patch_codec_delay(data: bytes, samples_48k: int) -> bytes:
    """The WebM with its CodecDelay (Matroska element 0x56AA, 3-byte value) set to ``samples_48k``."""
    at = data.find(b"\x56\xaa\x83", 0, 4096)
    assert at > 0, "CodecDelay element not found"
    ns = round(samples_48k * 1e9 / 48000)
    return data[:at + 3] + ns.to_bytes(3, "big") + data[at + 6:]


def _opus_head_pre_skip(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        head = bytes(container.streams.audio[0].codec_context.extradata)
    assert head.startswith(b"OpusHead")
    return int.from_bytes(head[10:12], "little")


def test_webm_opus_drops_the_pre_skip_not_the_codec_delay(ffmpeg, tmp_path):
    """The corpus WebM says CodecDelay 104 but OpusHead pre-skip 312 (48 kHz samples). FFmpeg 8
    alone keeps 208 samples of encoder delay; decode_audio drops the pre-skip, as ffmpeg 5.1
    does, whatever CodecDelay says (patched to 0, 52, 312 and 480 samples)."""
    import av

    path = CORPUS[WEBM]
    assert _opus_head_pre_skip(path) == 312
    side, plain = None, 0
    with av.open(str(path)) as container:  # PyAV as is
        for packet in container.demux(audio=0):
            if side is None and packet.size:  # what the demuxer puts on the first packet
                side = bytes(packet.get_sidedata("skip_samples"))
            plain += sum(frame.samples for frame in packet.decode())
    # the bug this fixes, as PyAV 18 / FFmpeg 8 has it: the first packet skips CodecDelay (104),
    # not the pre-skip, and 208 samples of encoder delay are kept
    assert int.from_bytes(side[:4], "little") == 104, ("first packet's skip_samples", side.hex())
    assert plain == 528000 + 208, ("PyAV as is", plain)

    ref, _ = reference(path)
    ours, rate = decode_audio(path)
    assert rate == 48000 and len(ours) == 528000  # 11 s exactly: what the encoder was given
    data = path.read_bytes()
    for delay in (0, 52, 312, 480):
        variant = tmp_path / f"codec_delay_{delay}.webm"
        variant.write_bytes(_patch_codec_delay(data, delay))
        x, sr = decode_audio(variant)
        assert sr == 48000 and np.array_equal(x, ours), delay
        r, _ = ffmpeg_decode(variant)
        c = compare(x, r)
        assert (c.lag, c.length_delta) == (0, 0) and c.max_diff <= PYAV_TOLERANCE, (delay, c)
    assert compare(ours, ref).lag == 0


# --------------------------------------------------------------------------- the table

def _table() -> str:
    """The per-file table of docs/decoders.md (Markdown)."""
    if _missing_tools():
        raise SystemExit(f"ffmpeg/ffprobe missing: {APT_LINE}")
    rows = [f"Reference: {_ffmpeg_version()}", "",
            "| file | decode_audio backend | rate (Hz) | samples | ffmpeg samples | length Δ | lag "
            "| max abs Δ | compared with | PyAV backend vs ffmpeg: length Δ, lag, max abs Δ |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(CORPUS):
        path = CORPUS[name]
        samples, rate, backend = decode_with_backend(path)
        if backend == "PyAV":
            (ref, _), how = reference(path), "ffmpeg"
        else:
            ref, _, how = libsndfile_reference(path, rate)
        c = compare(samples, ref)
        if path.suffix == ".opus" and backend != "PyAV":
            n = compare(samples, reference(path, rate)[0])
            how += f" (FFmpeg's Opus decoder: lag {n.lag:+d}, max abs Δ {n.max_diff:.1e})"
        if name in PYAV_BACKEND_FILES:
            d = audio._decode_pyav(str(path), DecodeConfig())
            p = compare(d.samples, reference(path)[0])
            pyav = f"{p.length_delta:+d}, {p.lag:+d}, {p.max_diff:.1e}"
        else:
            pyav = "not a PyAV input" if path.suffix == ".raw" else "FFmpeg rejects it"
        rows.append(f"| {name} | {backend} | {rate} | {c.n} | {c.n_ref} | {c.length_delta:+d} "
                    f"| {c.lag:+d} | {c.max_diff:.1e} | {how} | {pyav} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())
