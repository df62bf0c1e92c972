"""Audio decoding and resampling to mono float32.

Public entry points:
    TARGET_SAMPLE_RATE: the frontend rate, 16000 Hz.
    MIN_SAMPLE_RATE: streams below this rate (4000 Hz) are refused.
    PYAV_FORMATS: the container formats accepted from PyAV (an allowlist).
    DecodeConfig: decoder options (FFmpeg fallback, duration cap, soxr quality, remote audio).
    decode_audio(source, *, hint, config) -> (samples, sample_rate) at the stream's own rate.
    resample(samples, sample_rate, target_rate, quality) -> samples of length ceil(n*dst/src).
    load_audio(source, *, hint, config, target_rate, offset_s, duration_s, reader) -> samples at
        ``target_rate`` (of the whole file, or of one segment).
    probe_duration(source, *, hint, config) -> seconds, from the headers only.
    decode_segment(source, offset_s, duration_s, *, hint, config, reader) -> (samples, sample_rate)
        of one segment of a long recording, decoding only the segment (seek + trim).
    SegmentReader: keeps the last few files open for many segments of one file (per worker).

Decoding tries, in order (compatible with upstream spec section 4.1, see the notes per backend):
    1. soundfile (libsndfile): WAV/W64/RF64, FLAC, Ogg/Vorbis, Ogg/Opus, MP3, AIFF, AU, CAF, and
       headerless ``.raw``/``.pcm`` files (read as s16le 16 kHz mono; libsndfile cannot sniff
       headerless PCM, so the extension of the path or ``hint`` decides).
    2. Ogg/Opus repair: a stream whose OpusTags packet is missing is repaired in memory
       (:mod:`asr_assets._ogg_opus`) and decoded again with soundfile (then PyAV).
    3. PyAV (FFmpeg libraries, in-process; no ffmpeg executable is ever spawned): M4A/AAC,
       Matroska/WebM, Ogg-FLAC and the other formats of :data:`PYAV_FORMATS`. Disabled by
       ``DecodeConfig(ffmpeg_fallback=False)``.
Unlike the upstream Rust FFmpeg path, PyAV output is *not* resampled here: every backend returns
the stream's native rate (Opus: soundfile gives the encoder's original rate, PyAV 48 kHz).

Only the named file is read (hostile manifests, see the README's reliability section):
    * A local file is opened by Python and handed to FFmpeg as a file object, so FFmpeg uses no
      protocol for it (``concat:``, ``subfile,``, ``data:`` or ``pipe:`` in a path are just file
      names). FFmpeg may probe only the formats of :data:`PYAV_FORMATS` (its
      ``format_whitelist``, checked inside ``avformat_open_input`` *before* a demuxer reads its
      header, which is where the hls and concat demuxers would open the files they name), the
      format is checked again after opening, and any further file or URL a demuxer asks for is
      refused (PyAV ``io_open``). Playlists and scripts (``#EXTM3U`` HLS/M3U, ``ffconcat``,
      DASH/XML manifests, PLS) are recognised by their first bytes and refused before any
      decoder sees them, whatever the file is called.
    * URLs are never opened unless ``DecodeConfig(remote_audio=True)``; then only ``http`` and
      ``https`` (FFmpeg protocols http, https, tls, tcp, httpproxy), with FFmpeg's ``timeout``
      and ``rw_timeout`` and PyAV's interrupt timeout all set to ``network_timeout_s``, the same
      format allowlist, and no playlist or concat demuxer (so a remote file cannot name a local
      one either). Any other scheme (``file://``, ``ftp://``, ``rtsp://`` ...) is refused.

Decoded length, not a header's claim, is the truth:
    * FLAC: libsndfile stops at the STREAMINFO total (an under-claiming header loses the rest)
      and raises at the real end when the header over-claims or is 0 ("unknown"), losing its last
      read. The true length is read from the last frame's header (CRC-8 and CRC-16 checked; for
      fixed-blocksize streams also the previous frame's), the STREAMINFO total is corrected in an
      in-memory overlay and libsndfile decodes exactly that. When libsndfile still fails
      part-way, PyAV decodes the file as well and its decode is kept if it is longer, agrees
      with libsndfile's on their common part and is whole (the last frame's length, or, with a
      damaged end, at most one libsndfile read longer: FFmpeg skips a damaged middle frame
      silently, which must not pass for a whole decode).
    * MP3: libsndfile (mpg123) stops after the frames a Xing/Info header claims, FFmpeg after
      its bytes, so ``cat a.mp3 b.mp3`` decoded as ``a.mp3``. The frames are counted by walking
      the frame headers and both counts are corrected in the overlay (gapless trimming stays).
    * Chained Ogg (links one after another, ``cat a.ogg b.ogg``; libsndfile decodes only the
      first): each link is decoded on its own and the links are concatenated when they share a
      sample rate; otherwise the file is refused with the rates. The duration cap counts all links.
    * Opus in Matroska/WebM through PyAV: the OpusHead pre-skip is dropped from the start, not
      the track's CodecDelay when the two disagree (files muxed by FFmpeg 5.1 or older with
      libopus from 8-24 kHz input; FFmpeg 8 alone would keep 156-260 samples of encoder delay),
      as the ffmpeg 5.1 tool does. Otherwise PyAV output already has the ffmpeg tool's samples
      and alignment, including its limits (docs/decoders.md).
    * Streams below :data:`MIN_SAMPLE_RATE` are refused with their rate.

Partial data policy: when a local stream is damaged part-way (truncated FLAC "lost sync",
truncated MP3, a WAV header that claims more data than the file holds) the frames decoded before
the damage are kept, as long as at least one frame decoded. A truncated recording is still mostly
good speech; the record-level duration filters downstream decide whether to use it. A remote
stream that fails part-way (network error or timeout) is an error, not a short clip.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import io
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, NamedTuple, Union

import numpy as np
import soundfile as sf
import soxr

from asr_assets._ogg_opus import (
    OggRepairError,
    looks_like_ogg_opus,
    ogg_link_ranges,
    repair_missing_opustags,
)
from asr_assets.errors import AudioDecodeError

__all__ = [
    "TARGET_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "PYAV_FORMATS",
    "DecodeConfig",
    "decode_audio",
    "resample",
    "load_audio",
    "probe_duration",
    "SEEK_PREROLL_S",
    "SegmentReader",
    "decode_segment",
]

TARGET_SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 4000

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_BLOCK_FRAMES = 1 << 16  # soundfile read block (frames)
_PREALLOC_FRAMES = 1 << 23  # mono frames allocated ahead from a header's length (32 MiB; then grown)
#: Seconds decoded before a segment's start and dropped, for the libsndfile subtypes whose
#: decoder needs past frames to give, after a seek, the samples of a decode from the start
#: (MP3: the bit reservoir, the IMDCT overlap and the synthesis filter; measured exact to
#: 1.2e-7 from 0.25 s on). Lossless formats and Vorbis/Opus (libsndfile's own seek pre-roll)
#: seek without it.
SEEK_PREROLL_S = 0.5
_PREROLL_SUBTYPES = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"})
_RAW_EXTENSIONS = {".raw", ".pcm"}
_RAW_KWARGS = {"format": "RAW", "subtype": "PCM_16", "endian": "LITTLE", "samplerate": 16000,
               "channels": 1}
_SNIFF_BYTES = 64 * 1024
_MAX_OGG_LINKS = 256
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX frames for an unknown length

#: FFmpeg demuxers accepted from PyAV (any name of ``container.format.name``, which is a comma
#: list such as ``"mov,mp4,m4a,3gp,3g2,mj2"``). None of them opens another file or URL (the mov
#: demuxer's external data references are off: ``enable_drefs=0``). Everything else is refused,
#: in particular hls, concat (ffconcat), dash, image2, lavfi, sdp/rtp/rtsp, tee, data.
PYAV_FORMATS = frozenset({
    "aac", "ac3", "aiff", "amr", "amrnb", "amrwb", "ape", "asf", "au", "avi", "caf", "dsf", "dts",
    "dtshd", "eac3", "flac", "flv", "iff", "ircam", "matroska", "mlp", "mov", "mp3", "mpc", "mpc8",
    "mpeg", "mpegts", "nistsphere", "ogg", "rm", "shn", "tak", "truehd", "tta", "voc", "w64", "wav",
    "wv",
})
_FORMAT_WHITELIST = ",".join(sorted(PYAV_FORMATS))
_LOCAL_AV_OPTIONS = {"format_whitelist": _FORMAT_WHITELIST, "protocol_whitelist": "file",
                     "enable_drefs": "0", "use_absolute_path": "0"}
_REMOTE_PROTOCOLS = "http,https,tls,tcp,httpproxy"
_REMOTE_SCHEMES = ("http", "https")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclass(frozen=True)
class DecodeConfig:
    """Options of :func:`decode_audio`.

    Attributes:
        ffmpeg_fallback: allow the PyAV (in-process FFmpeg libraries) backend after soundfile.
        max_duration_s: if set, audio longer than this many seconds raises AudioDecodeError.
            Decoding stops as soon as the cap is exceeded, so at most about ``max_duration_s``
            seconds of samples (plus one block/frame) are ever held in memory.
        resample_quality: soxr quality string (``"VHQ"``, ``"HQ"``, ``"MQ"``, ``"LQ"``, ``"QQ"``).
        remote_audio: allow ``http://``/``https://`` sources (decoded by PyAV, so it also needs
            ``ffmpeg_fallback``). Off by default: a URL is then refused without connecting.
            Even when on, playlist and concat demuxers stay refused, so a remote file can never
            make the decoder open a local file (confinement of local paths is unaffected).
        network_timeout_s: with ``remote_audio``, the limit of the connection and of every
            network read (FFmpeg ``timeout``/``rw_timeout`` and PyAV's open/read timeout).
    """

    ffmpeg_fallback: bool = True
    max_duration_s: float | None = None
    resample_quality: str = "HQ"
    remote_audio: bool = False
    network_timeout_s: float = 30.0


class _Fatal(Exception):
    """A definitive verdict (e.g. too long) that must not fall through to other backends."""


class _TooLong(_Fatal):
    pass


class _BadRate(_Fatal):
    pass


class _Decoded(NamedTuple):
    samples: np.ndarray
    sample_rate: int
    damaged: bool = False  # the stream failed part-way; frames before the damage were kept
    flac: bool = False
    true_length: int | None = None  # FLAC: samples up to the end of its last valid frame


@dataclass(frozen=True)
class _Slice:
    """Bytes ``[start, end)`` of a local file (one link of a chained Ogg file)."""

    path: str
    start: int
    end: int


_Local = Union[str, bytes, _Slice]


class _Window(io.RawIOBase):
    """Seekable read-only view of bytes ``[start, end)`` of a binary file, with an optional
    overlay ``(offset, data)`` that replaces those bytes (a corrected header)."""

    def __init__(self, fh, start: int = 0, end: int | None = None,
                 overlay: tuple[int, bytes] | None = None):
        super().__init__()
        if end is None:
            end = fh.seek(0, os.SEEK_END)
        self._fh, self._start, self._len, self._pos = fh, start, max(0, end - start), 0
        self._overlay = overlay

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._len - self._pos))
        if n == 0:
            return 0
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        k = len(data)
        view = memoryview(buffer).cast("B")
        view[:k] = data
        if self._overlay is not None:
            off, patch = self._overlay
            lo, hi = max(self._pos, off), min(self._pos + k, off + len(patch))
            if lo < hi:
                view[lo - self._pos:hi - self._pos] = patch[lo - off:hi - off]
        self._pos += k
        return k

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            super().close()


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


def _url_scheme(source: Source) -> str | None:
    """The lower-cased scheme of a ``scheme://`` source, None for bytes and local paths."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return None
    match = _URL_RE.match(str(os.fspath(source)))
    return match.group(1).lower() if match else None


def _local(source: Source) -> _Local:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return os.fspath(source)


def _open_binary(source: _Local):
    """A fresh seekable binary file object over the source (the caller closes it)."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, _Slice):
        return _Window(open(source.path, "rb"), source.start, source.end)
    return open(source, "rb")


def _size(source: _Local) -> int:
    if isinstance(source, bytes):
        return len(source)
    if isinstance(source, _Slice):
        return source.end - source.start
    return os.path.getsize(source)


def _read_at(source: _Local, offset: int, n: int) -> bytes:
    if isinstance(source, bytes):
        return source[offset:offset + n]
    with _open_binary(source) as fh:
        fh.seek(offset)
        return fh.read(n)


def _read_head(source: _Local, n: int = _SNIFF_BYTES) -> bytes:
    return _read_at(source, 0, n)


def _read_file(source: _Local) -> bytes:
    if isinstance(source, bytes):
        return source
    with _open_binary(source) as fh:
        return fh.read()


@contextlib.contextmanager
def _sf_input(source: _Local, overlay: tuple[int, bytes] | None) -> Iterator:
    """What to hand to ``sf.SoundFile``: a path as is, otherwise a file object."""
    if isinstance(source, str) and overlay is None:
        yield source
        return
    fh = _open_binary(source)
    try:
        yield _Window(fh, overlay=overlay) if overlay is not None else fh
    finally:
        fh.close()


def _max_frames(sample_rate: int, max_duration_s: float | None) -> int | None:
    return None if max_duration_s is None else int(math.floor(max_duration_s * sample_rate))


def _check_rate_channels(sample_rate: int, channels: int) -> None:
    if channels <= 0:
        raise ValueError(f"zero channels ({channels})")
    if sample_rate <= 0:
        raise ValueError(f"invalid sample rate {sample_rate}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise _BadRate(f"sample rate {sample_rate} Hz is below the minimum of {MIN_SAMPLE_RATE} Hz")


def _finish(blocks: list[np.ndarray], sample_rate: int) -> tuple[np.ndarray, int]:
    samples = np.concatenate(blocks).astype(np.float32, copy=False) if blocks else None
    if samples is None or samples.size == 0:
        raise ValueError("no samples")
    return samples, sample_rate


def _reference_kind(head: bytes) -> str | None:
    """What a file that names other files or URLs is, from its first bytes; None for others."""
    text = head[:4096]
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    text = text.lstrip()
    low = text[:1024].lower()
    if text.startswith(b"#EXTM3U"):
        return "an HLS/M3U playlist (#EXTM3U)"
    if low.startswith(b"ffconcat version"):
        return "an ffconcat script"
    if low.startswith(b"[playlist]"):
        return "a PLS playlist"
    if low.startswith(b"<") and (b"<mpd" in low or b"<smil" in low or b"<smoothstreamingmedia" in low):
        return "a DASH/SMIL/XML streaming manifest"
    return None


# --------------------------------------------------------------------------- FLAC length

_FLAC_TAIL = 1 << 20  # bytes searched from the end for the last frame(s)
_FLAC_CRC_CHECKS = 8  # CRC-16 verifications per search (bounds the cost of hostile tails)
_TOTAL_MASK = (1 << 36) - 1


def _crc_table(poly: int, bits: int) -> tuple[int, ...]:
    top, mask, table = 1 << (bits - 1), (1 << bits) - 1, []
    for i in range(256):
        r = i << (bits - 8)
        for _ in range(8):
            r = ((r << 1) ^ poly) if r & top else (r << 1)
        table.append(r & mask)
    return tuple(table)


_CRC8 = _crc_table(0x07, 8)
_CRC16 = _crc_table(0x8005, 16)


def _crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = _CRC8[crc ^ b]
    return crc


#: The CRC-16 table for two bytes at once: ``_CRC16_WORDS[v]`` is the CRC of the big-endian
#: 16-bit word ``v``. With a 16-bit register, the CRC after a word ``w`` is ``table[crc ^ w]``:
#: half the steps of the byte table (~3x faster over a frame). Built on first use (~15 ms).
_CRC16_WORDS: list[int] | None = None


def _crc16(data: bytes) -> int:
    """FLAC's frame CRC-16 (RFC 9639 section 9.3: polynomial 0x8005, initial value 0, not
    reflected; ``_crc16(b"123456789") == 0xFEE8``), two bytes per step."""
    global _CRC16_WORDS
    table = _CRC16_WORDS
    if table is None:  # complete before it is shared (threads may decode at once)
        table = _CRC16_WORDS = [((_CRC16[v >> 8] << 8) & 0xFFFF) ^ _CRC16[(_CRC16[v >> 8] >> 8) ^ (v & 0xFF)]
                                for v in range(1 << 16)]
    even = len(data) & ~1
    words = array.array("H", data[:even])
    if sys.byteorder == "little":
        words.byteswap()
    crc = 0
    for word in words:
        crc = table[crc ^ word]
    if even != len(data):
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ data[-1]]
    return crc


class _FlacHeader(NamedTuple):
    variable: bool  # variable-blocksize stream: ``number`` is a sample number, else a frame number
    number: int
    blocksize: int


def _flac_frame_header(buf: bytes, p: int) -> _FlacHeader | None:
    """Parse a FLAC frame header at ``buf[p]`` (RFC 9639 section 9.1); None unless CRC-8 holds."""
    if p + 6 > len(buf) or buf[p] != 0xFF or buf[p + 1] & 0xFE != 0xF8:
        return None
    variable = bool(buf[p + 1] & 1)
    bs_code, sr_code = buf[p + 2] >> 4, buf[p + 2] & 0x0F
    channels, bits = buf[p + 3] >> 4, (buf[p + 3] >> 1) & 7
    if bs_code == 0 or sr_code == 15 or channels > 10 or bits == 3 or buf[p + 3] & 1:
        return None
    q, first = p + 4, buf[p + 4]
    for extra, (lo, hi, keep) in enumerate(((0x00, 0x80, 0x7F), (0xC0, 0xE0, 0x1F),
                                            (0xE0, 0xF0, 0x0F), (0xF0, 0xF8, 0x07),
                                            (0xF8, 0xFC, 0x03), (0xFC, 0xFE, 0x01),
                                            (0xFE, 0xFF, 0x00))):
        if lo <= first < hi:
            break
    else:
        return None
    if extra == 1 and first < 0xC2 or (not variable and extra > 5) or q + 1 + extra > len(buf):
        return None
    number = first & keep
    for c in buf[q + 1:q + 1 + extra]:
        if c & 0xC0 != 0x80:
            return None
        number = (number << 6) | (c & 0x3F)
    q += 1 + extra
    if bs_code == 6:
        if q + 1 > len(buf):
            return None
        blocksize, q = buf[q] + 1, q + 1
    elif bs_code == 7:
        if q + 2 > len(buf):
            return None
        blocksize, q = ((buf[q] << 8) | buf[q + 1]) + 1, q + 2
    elif bs_code == 1:
        blocksize = 192
    elif bs_code <= 5:
        blocksize = 576 << (bs_code - 2)
    else:
        blocksize = 256 << (bs_code - 8)
    q += {12: 1, 13: 2, 14: 2}.get(sr_code, 0)
    if q >= len(buf) or _crc8(buf[p:q]) != buf[q]:
        return None
    return _FlacHeader(variable, number, blocksize)


def _flac_find_frame(tail: bytes, end: int, want: Callable[[_FlacHeader], bool]):
    """The last frame ending exactly at ``tail[end]``: (position, header) or None."""
    p, checks = end, 0
    while checks < _FLAC_CRC_CHECKS:
        p = tail.rfind(b"\xff", 0, p)
        if p < 0:
            return None
        header = _flac_frame_header(tail, p)
        if header is None or not want(header) or end - p < 8:
            continue
        checks += 1
        if _crc16(tail[p:end]) == 0:  # a frame's CRC-16 covers it up to and with its own CRC
            return p, header
    return None


class _FlacLength(NamedTuple):
    claimed: int  # STREAMINFO total samples (0: unknown)
    true_length: int | None  # samples up to the end of the last valid frame, None if not found
    field_offset: int  # file offset of the 8 bytes that hold rate/channels/bits/total
    field: bytes


def _flac_length(source: _Local, head: bytes) -> _FlacLength | None:
    """STREAMINFO's claimed length and the true one from the last frame(s); None if not FLAC."""
    pos = _skip_id3v2(head, 0)  # ID3v2 before fLaC (libsndfile skips it)
    marker = head[pos:pos + 8] if pos + 8 <= len(head) else _read_at(source, pos, 8)
    if marker[:4] != b"fLaC" or marker[4] & 0x7F != 0 or marker[5:8] != b"\x00\x00\x22":
        return None
    info = head[pos + 8:pos + 42] if pos + 42 <= len(head) else _read_at(source, pos + 8, 34)
    if len(info) < 34:
        return None
    min_bs, max_bs = struct.unpack(">HH", info[:4])
    max_frame = int.from_bytes(info[7:10], "big")
    field = info[10:18]
    claimed = int.from_bytes(field, "big") & _TOTAL_MASK
    size = _size(source)
    window = min(size - pos - 42, _FLAC_TAIL if max_frame == 0 else min(_FLAC_TAIL, 2 * max_frame + 512))
    if window <= 0:
        return _FlacLength(claimed, None, pos + 18, field)
    tail = _read_at(source, size - window, window)
    return _FlacLength(claimed, _flac_tail_end(tail, min_bs, max_bs), pos + 18, field)


def _flac_tail_end(tail: bytes, min_bs: int, max_bs: int) -> int | None:
    ends = [len(tail)]
    if len(tail) > 128 and tail[-128:-125] == b"TAG":  # ID3v1 after the last frame
        ends.append(len(tail) - 128)
    for end in ends:
        last = _flac_find_frame(tail, end, lambda h: True)
        if last is None:
            continue
        p, header = last
        if header.variable:
            true_end = header.number + header.blocksize
        elif header.number == 0:
            true_end = header.blocksize
        else:  # fixed blocksize: every frame but the last has the previous frame's size
            k = header.number
            prev = _flac_find_frame(tail, p, lambda h, k=k: not h.variable and h.number == k - 1)
            if prev is not None:
                stride = prev[1].blocksize
            elif min_bs == max_bs and min_bs >= 16:
                stride = min_bs
            else:
                return None
            if header.blocksize > stride:
                return None
            true_end = k * stride + header.blocksize
        return true_end if 0 < true_end <= _TOTAL_MASK else None
    return None


def _flac_overlay(fl: _FlacLength | None) -> tuple[int, bytes] | None:
    """A corrected STREAMINFO total when the last frame shows the header is wrong."""
    if fl is None or fl.true_length is None or fl.true_length == fl.claimed:
        return None
    value = (int.from_bytes(fl.field, "big") & ~_TOTAL_MASK) | fl.true_length
    return fl.field_offset, value.to_bytes(8, "big")


# --------------------------------------------------------------------------- MP3 length

_MP3_BITRATES = {  # kbit/s by (MPEG-1?, layer)
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class _Mp3Frame(NamedTuple):
    key: tuple[int, int, int]  # (version, layer, rate): constant through a stream
    length: int  # bytes
    samples: int
    mono: bool


def _mp3_frame(b: bytes, p: int) -> _Mp3Frame | None:
    """The MPEG audio frame header at ``b[p]``, or None (free-format bitrate: None)."""
    if p + 4 > len(b) or b[p] != 0xFF or b[p + 1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (b[p + 1] >> 3) & 3, (b[p + 1] >> 1) & 3
    bitrate_idx, rate_idx, padding = b[p + 2] >> 4, (b[p + 2] >> 2) & 3, (b[p + 2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_idx in (0, 15) or rate_idx == 3:
        return None
    layer, mpeg1 = 4 - layer_bits, version == 3
    bitrate = _MP3_BITRATES[(mpeg1, layer)][bitrate_idx] * 1000
    rate = _MP3_RATES[version][rate_idx]
    if layer == 1:
        length, samples = (12 * bitrate // rate + padding) * 4, 384
    elif layer == 2 or mpeg1:
        length, samples = 144 * bitrate // rate + padding, 1152
    else:
        length, samples = 72 * bitrate // rate + padding, 576
    return _Mp3Frame((version, layer, rate), length, samples, b[p + 3] >> 6 == 3)


def _skip_id3v2(data: bytes, pos: int) -> int:
    if data[pos:pos + 3] != b"ID3" or len(data) < pos + 10:
        return pos
    size = 0
    for b in data[pos + 6:pos + 10]:
        size = (size << 7) | (b & 0x7F)
    return pos + 10 + size + (10 if data[pos + 5] & 0x10 else 0)


def _mp3_overlay(source: _Local, head: bytes, config: DecodeConfig) -> tuple[int, bytes] | None:
    """Corrected Xing/Info frame and byte counts when the file has more frames than they claim.

    libsndfile (mpg123) stops after the claimed frames and FFmpeg after the claimed bytes, so
    ``cat a.mp3 b.mp3`` or a header whose counts were cut would decode short. The frames are
    counted by walking the frame headers (ID3 tags between them are skipped); with
    ``max_duration_s`` the walk stops a little past the cap (the decode then refuses the file).
    """
    pos = _skip_id3v2(head, 0)
    first = _mp3_frame(head, pos)
    if first is None or first.key[1] != 3:
        return None
    side = (17 if first.mono else 32) if first.key[0] == 3 else (9 if first.mono else 17)
    tag = pos + 4 + side
    if head[tag:tag + 4] not in (b"Xing", b"Info") or len(head) < tag + 16:
        return None
    flags = struct.unpack_from(">I", head, tag + 4)[0]
    if not flags & 1:
        return None
    claimed = struct.unpack_from(">I", head, tag + 8)[0]
    limit = None
    if config.max_duration_s is not None:
        # past the cap by more than any encoder delay + padding that gapless decoding trims
        limit = int(config.max_duration_s * first.key[2] / first.samples) + 8
    frames, end = 0, pos + first.length
    with _open_binary(source) as fh:
        fh.seek(end)
        buf, base = fh.read(1 << 20), end  # buf holds bytes [base, base + len(buf))
        while limit is None or frames < limit:
            at = end - base
            if at + 10 > len(buf):
                fh.seek(end)
                buf, base, at = fh.read(1 << 20), end, 0
                if len(buf) < 4:
                    break
            frame = _mp3_frame(buf, at)
            if frame is not None and frame.key == first.key:
                frames, end = frames + 1, end + frame.length
                continue
            skipped = _skip_id3v2(buf, at)
            if skipped != at:
                end = base + skipped
            elif buf[at:at + 3] == b"TAG" and len(buf) - at > 128:
                end += 128
            else:
                break
    if frames <= claimed:
        return None
    counts = struct.pack(">I", min(frames, 0xFFFFFFFF))
    if flags & 2:
        counts += struct.pack(">I", min(end - pos, 0xFFFFFFFF))
    return tag + 8, counts


# --------------------------------------------------------------------------- backends

def _decode_soundfile(source: _Local, ext: str, config: DecodeConfig,
                      head: bytes | None = None) -> _Decoded:
    raw = ext in _RAW_EXTENSIONS
    kwargs = _RAW_KWARGS if raw else {}
    overlay = None
    fl = None
    if not raw:
        if head is None:
            head = _read_head(source)
        fl = _flac_length(source, head)
        overlay = _flac_overlay(fl) or _mp3_overlay(source, head, config)
    damaged = False
    with _sf_input(source, overlay) as target, sf.SoundFile(target, mode="r", **kwargs) as f:
        sample_rate, channels = int(f.samplerate), int(f.channels)
        is_flac = f.format == "FLAC"
        _check_rate_channels(sample_rate, channels)
        limit = _max_frames(sample_rate, config.max_duration_s)
        blocks: list[np.ndarray] = []
        total = 0
        chunk = _BLOCK_FRAMES
        if str(f.subtype) in _PREROLL_SUBTYPES and 0 < f.frames < _UNKNOWN_FRAMES:
            # libsndfile 1.2.2's MP3 decoder corrupts samples at some read boundaries (up to
            # 0.25 full scale, a few ms each, at ~1 in 3 reads of 65536 frames; one read equals
            # FFmpeg's decode to 2e-6): read it in one call, at most one block past the cap.
            chunk = int(f.frames) if limit is None else min(int(f.frames), limit + 1)
            chunk = max(chunk, 1)
        # Mono (nearly every speech corpus) is read straight into the result: no copy of each
        # block, no concatenation (~0.5 ms of a ~4 ms decode of a 7 s FLAC). Its capacity is
        # the header's length plus one frame, so a stream longer than its header says is seen
        # (and read on, the buffer grown); within the cap and _PREALLOC_FRAMES, since a hostile
        # header may claim anything.
        frames = int(f.frames) if 0 < f.frames < _UNKNOWN_FRAMES else 0
        if channels == 1:
            ahead = frames if limit is None else min(frames, limit)
            if chunk == _BLOCK_FRAMES:  # (an MP3 keeps its one read of the whole stream)
                ahead = min(ahead, _PREALLOC_FRAMES)
            out = np.empty(ahead + 1 if frames else chunk, dtype=np.float32)
        else:
            buf = np.empty((chunk, channels), dtype=np.float32)
        while True:
            if channels == 1:
                if total == len(out):
                    grown = np.empty(max(2 * len(out), total + chunk), dtype=np.float32)
                    grown[:total] = out
                    out = grown
                want = min(chunk, len(out) - total)
            else:
                want = chunk
            try:
                if channels == 1:
                    n = f.read(frames=want, dtype="float32", out=out[total:total + want]).shape[0]
                else:
                    n = f.read(frames=want, dtype="float32", always_2d=True, out=buf).shape[0]
            except (sf.LibsndfileError, RuntimeError):
                # Damaged stream (e.g. truncated FLAC "lost sync"): libsndfile raises after
                # filling part of the buffer; its position tells how many frames are valid.
                try:
                    n = min(max(f.tell() - total, 0), want)
                except Exception:  # noqa: BLE001
                    n = 0
                if total + n == 0:
                    raise
                damaged = True
            if n == 0:
                break
            if channels > 1:
                blocks.append(buf[:n].mean(axis=1))
            total += n
            if limit is not None and total > limit:
                raise _TooLong(f"longer than max_duration_s={config.max_duration_s} s")
            if damaged:
                break
    if channels == 1:
        if total == 0:
            raise ValueError("no samples")
        return _Decoded(out[:total], sample_rate, damaged, is_flac, fl.true_length if fl else None)
    samples, sample_rate = _finish(blocks, sample_rate)
    return _Decoded(samples, sample_rate, damaged, is_flac, fl.true_length if fl else None)


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


class _AVFile:
    """The file object handed to PyAV: a failed seek returns ``AVERROR(EINVAL)`` as FFmpeg's
    ``file`` protocol does, instead of an exception that PyAV would stash and re-raise later."""

    def __init__(self, fh, name: str | None):
        self._fh = fh
        if name is not None:
            self.name = name  # FFmpeg's probe also scores the file name's extension

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            return -22
        try:
            return self._fh.seek(offset, whence)
        except (OSError, ValueError):
            return -22  # AVERROR(EINVAL)

    def tell(self) -> int:
        return self._fh.tell()


def _refuse_nested(url: str, flags: int, options: dict):
    """PyAV ``io_open``: a demuxer asked for another file or URL; never granted."""
    raise PermissionError(f"refused to open {url!r}: a container may not open other files or URLs")


@contextlib.contextmanager
def _pyav_container(source: _Local, config: DecodeConfig):
    """An opened PyAV input container whose format is in :data:`PYAV_FORMATS`.

    ``source`` is a local source, or an ``http(s)://`` URL string when the caller has checked
    ``config.remote_audio``.
    """
    import av  # imported lazily: only needed for the fallback

    fh = None
    try:
        if isinstance(source, str) and _url_scheme(source) in _REMOTE_SCHEMES:
            timeout = float(config.network_timeout_s)
            micros = str(max(1, int(timeout * 1e6)))
            options = {**_LOCAL_AV_OPTIONS, "protocol_whitelist": _REMOTE_PROTOCOLS,
                       "timeout": micros, "rw_timeout": micros, "reconnect": "0"}
            opener = lambda: av.open(source, mode="r", container_options=options,  # noqa: E731
                                     timeout=(timeout, timeout))
        else:
            fh = _open_binary(source)
            avfile = _AVFile(fh, source if isinstance(source, str) else None)
            opener = lambda: av.open(avfile, mode="r", container_options=_LOCAL_AV_OPTIONS,  # noqa: E731
                                     io_open=_refuse_nested)
        try:
            container = opener()
        except av.error.ArgumentError as exc:  # EINVAL, e.g. "Format not on whitelist"
            raise ValueError(f"{_msg(exc)} (invalid data, or a container format outside the "
                             "allowlist asr_assets.audio.PYAV_FORMATS)") from exc
        with container:
            name = container.format.name or ""
            if not set(name.split(",")) & PYAV_FORMATS:
                raise _Fatal(f"container format {name!r} is not in the allowlist")
            yield container
    finally:
        if fh is not None:
            fh.close()


_SKIP_SAMPLES = "skip_samples"  # AV_PKT_DATA_SKIP_SAMPLES: u32le start skip, u32le end discard


def _matroska_opus_pre_skip(container, stream) -> int | None:
    """The OpusHead pre-skip (48 kHz samples) of an Opus track in Matroska/WebM, else None.

    A Matroska Opus track states its start twice: the OpusHead pre-skip in CodecPrivate
    (RFC 7845 section 5.1) and the track's CodecDelay (RFC 9559), which should be equal.
    FFmpeg's Matroska muxer up to libavformat 59.30 wrote CodecDelay in the encoder's input rate
    (16 kHz input: 104 samples for a pre-skip of 312). libavformat 62 (FFmpeg 8, PyAV 18) puts
    CodecDelay on the first packet as skip_samples side data, which replaces the decoder's own
    pre-skip; the ffmpeg 5.1 command-line tool skips the pre-skip, which is exactly the delay
    the encoder added (see docs/decoders.md).
    """
    if "matroska" not in (container.format.name or "").split(","):
        return None
    cc = stream.codec_context
    if (cc.name or "") not in ("opus", "libopus"):
        return None
    head = bytes(cc.extradata or b"")
    if len(head) < 19 or not head.startswith(b"OpusHead"):
        return None
    return int.from_bytes(head[10:12], "little")


def _apply_pre_skip(packet, pre_skip: int) -> None:
    """Make the first packet's start skip the OpusHead pre-skip (its end discard is kept).

    Without skip_samples side data the decoder skips its own pre-skip already; with it, the side
    data's start skip replaces it (libavcodec ``decode.c``), so that field is set to the pre-skip.
    Needs PyAV's packet side-data API (``Packet.has_sidedata``, PyAV 18 has it); without it the
    packet is left as the demuxer made it.
    """
    if not hasattr(packet, "has_sidedata") or not packet.has_sidedata(_SKIP_SAMPLES):
        return
    side = packet.get_sidedata(_SKIP_SAMPLES)
    data = bytearray(bytes(side))
    if len(data) < 10 or int.from_bytes(data[0:4], "little") == pre_skip:
        return
    data[0:4] = pre_skip.to_bytes(4, "little")
    side.update(bytes(data))
    packet.set_sidedata(side)  # av_packet_add_side_data replaces side data of the same type


def _decode_pyav(source: _Local, config: DecodeConfig) -> _Decoded:
    import av

    remote = isinstance(source, str) and _url_scheme(source) is not None
    with _pyav_container(source, config) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        sample_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        blocks: list[np.ndarray] = []
        total = 0
        limit = None
        damaged = False
        pre_skip = _matroska_opus_pre_skip(container, stream)
        first_packet = True
        try:
            for packet in container.demux(stream):  # what container.decode(stream) does, per packet
                if first_packet and packet.size:
                    first_packet = False
                    if pre_skip is not None:
                        _apply_pre_skip(packet, pre_skip)
                for frame in packet.decode():
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
        except av.error.PatchWelcomeError as exc:
            if total and "ogg" in (container.format.name or "").split(","):
                raise _Fatal(f"the Ogg stream changes its codec parameters after {total} samples "
                             "(a chained Ogg file?); FFmpeg cannot decode it whole") from exc
            if total == 0 or remote:
                raise
            damaged = True
        except av.error.FFmpegError as exc:
            if total == 0:
                raise
            if remote:
                raise ValueError(f"remote stream failed after {total} samples: {_msg(exc)}") from exc
            damaged = True  # damaged tail: keep the frames decoded so far (see module docstring)
    samples, sample_rate = _finish(blocks, sample_rate)
    return _Decoded(samples, sample_rate, damaged, False)


def _decode_repaired_opus(source: _Local, config: DecodeConfig) -> _Decoded:
    if not looks_like_ogg_opus(_read_head(source)):
        raise OggRepairError("not an Ogg/Opus stream")
    repaired = repair_missing_opustags(_read_file(source))
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


def _msg(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text


def _agrees(short: np.ndarray, long: np.ndarray) -> bool:
    """Does ``long`` start with ``short`` (two decoders of one lossless stream)?"""
    n = min(len(short), len(long))
    return n > 0 and float(np.max(np.abs(short[:n] - long[:n]))) <= 1e-4


def _run_backends(source: _Local, ext: str, name: str, config: DecodeConfig,
                  head: bytes | None) -> tuple[np.ndarray, int]:
    backends: list[tuple[str, Callable[[], _Decoded]]] = [
        ("soundfile", lambda: _decode_soundfile(source, ext, config, head)),
        ("ogg-opus-repair", lambda: _decode_repaired_opus(source, config)),
    ]
    if config.ffmpeg_fallback:
        backends.append(("pyav", lambda: _decode_pyav(source, config)))

    failures: list[str] = []
    last_exc: BaseException | None = None
    result: _Decoded | None = None
    used = ""
    for backend, run in backends:
        try:
            result, used = run(), backend
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

    if used == "soundfile" and result.damaged and result.flac and config.ffmpeg_fallback:
        # libsndfile failed part-way through a FLAC (and loses its last read when it does):
        # FFmpeg decodes up to the end of the data. Its decode replaces libsndfile's if it is
        # longer, agrees on their common part and is whole: exactly the length the last frame
        # gives, or (end damaged, length unknown) at most one libsndfile read longer. FFmpeg
        # skips a damaged frame without an error, so a longer decode could hide a hole.
        try:
            other = _decode_pyav(source, config)
        except _Fatal as exc:
            raise AudioDecodeError(name, f"pyav: {_msg(exc)}") from exc
        except Exception:  # noqa: BLE001 - libsndfile's partial decode stands
            other = None
        if other is not None:
            n, m = len(result.samples), len(other.samples)
            whole = m == result.true_length if result.true_length else m <= n + _BLOCK_FRAMES
            if other.sample_rate == result.sample_rate and m > n and whole \
                    and _agrees(result.samples, other.samples):
                result = other
    return result.samples, result.sample_rate


def _ogg_links(source: _Local) -> list[tuple[int, int]]:
    with _open_binary(source) as fh:
        return ogg_link_ranges(fh, _size(source), max_links=_MAX_OGG_LINKS)


def _link(source: _Local, start: int, end: int) -> _Local:
    if isinstance(source, bytes):
        return source[start:end]
    if isinstance(source, _Slice):
        return _Slice(source.path, source.start + start, source.start + end)
    return _Slice(source, start, end)


def _decode_chained(source: _Local, links: list[tuple[int, int]], ext: str, name: str,
                    config: DecodeConfig) -> tuple[np.ndarray, int]:
    n = len(links)
    if n > _MAX_OGG_LINKS:
        raise AudioDecodeError(name, f"chained Ogg file with more than {_MAX_OGG_LINKS} links")
    parts: list[np.ndarray] = []
    rates: list[int] = []
    seconds = 0.0
    for i, (start, end) in enumerate(links, start=1):
        link_config = config
        if config.max_duration_s is not None:
            link_config = dataclasses.replace(config, max_duration_s=config.max_duration_s - seconds)
        try:
            if link_config.max_duration_s is not None and link_config.max_duration_s < 0:
                raise AudioDecodeError(name, "longer than max_duration_s")
            samples, rate = _run_backends(_link(source, start, end), ext, name, link_config, None)
        except AudioDecodeError as exc:
            if "longer than max_duration_s" in exc.reason:
                raise AudioDecodeError(
                    name, f"longer than max_duration_s={config.max_duration_s} s "
                          f"(chained Ogg file, {n} links)") from exc
            raise AudioDecodeError(
                name, f"chained Ogg file, link {i} of {n} (bytes {start}-{end}): {exc.reason}") from exc
        parts.append(samples)
        rates.append(rate)
        seconds += len(samples) / rate
    if len(set(rates)) > 1:
        raise AudioDecodeError(
            name, f"chained Ogg file whose {n} links have different sample rates "
                  f"({', '.join(str(r) for r in rates)} Hz); not decoded (it would need resampling "
                  "part-way)")
    return np.concatenate(parts), rates[0]


def _check_url(source: Source, scheme: str, name: str, config: DecodeConfig) -> str:
    """The URL to hand to FFmpeg, or AudioDecodeError when it must not be opened."""
    if scheme not in _REMOTE_SCHEMES:
        raise AudioDecodeError(
            name, f"URL scheme {scheme!r} is not supported (local paths, and http/https with "
                  "remote_audio=True); not opened")
    if not config.remote_audio:
        raise AudioDecodeError(
            name, "remote audio is disabled (DecodeConfig.remote_audio=False); the URL was not opened")
    if not config.ffmpeg_fallback:
        raise AudioDecodeError(
            name, "remote audio is decoded by PyAV, which is disabled (ffmpeg_fallback=False)")
    url = str(os.fspath(source))
    return scheme + url[len(scheme):]  # FFmpeg's protocol names are lower case


def _remote_msg(exc: BaseException, config: DecodeConfig) -> str:
    import av

    cause = exc if isinstance(exc, (av.error.ExitError, TimeoutError)) else exc.__cause__
    if isinstance(cause, (av.error.ExitError, TimeoutError)):
        return (f"network timeout: no answer within network_timeout_s={config.network_timeout_s} s "
                f"({_msg(exc)})")
    return _msg(exc)


def _local_head(source: _Local, name: str) -> bytes:
    """The first bytes (b"" if unreadable: the backends report why); refuses playlists and
    empty files (whose backends' messages would not say so)."""
    try:
        head = _read_head(source)
    except OSError:
        return b""
    if not head:
        raise AudioDecodeError(name, "empty file (0 bytes)" if isinstance(source, str) else "empty input (0 bytes)")
    kind = _reference_kind(head)
    if kind is not None:
        raise AudioDecodeError(
            name, f"{kind}, not audio: files that name other files or URLs are never followed")
    return head


def decode_audio(
    source: Source,
    *,
    hint: str | None = None,
    config: DecodeConfig = DecodeConfig(),
) -> tuple[np.ndarray, int]:
    """Decode a file or in-memory container to mono float32 samples at the stream's own rate.

    Backends are tried in order: soundfile, Ogg/Opus OpusTags repair, PyAV (if
    ``config.ffmpeg_fallback``); see the module docstring, also for what is never opened and
    which lengths are corrected. Channels are averaged to mono.

    Args:
        source: a local path (``str``/``os.PathLike``), the raw container bytes, or (only with
            ``config.remote_audio``) an ``http://``/``https://`` URL.
        hint: file name or extension for bytes input (e.g. the manifest's audio path); only its
            extension is used (``.raw``/``.pcm`` selects headerless s16le 16 kHz mono). For a path
            source a hint overrides the path's own extension.
        config: decoder options.

    Returns:
        ``(samples, sample_rate)``: ``samples`` is a float32 array of shape ``(n,)``, n >= 1,
        nominally in [-1, 1] (integer PCM is scaled by 1/2**(bits-1); float sources are passed
        through unclipped); ``sample_rate`` is in Hz (>= :data:`MIN_SAMPLE_RATE`).

    Raises:
        AudioDecodeError: every backend failed (the message names the source and each backend's
            failure; chained from the last exception), the file or bytes are empty ("empty
            file (0 bytes)"), or the stream has 0 samples, a sample rate
            below :data:`MIN_SAMPLE_RATE` or zero channels, contains NaN/Inf samples (the reason
            gives the count), or is longer than ``config.max_duration_s``; the source is a
            playlist/concat script, a URL (unless ``remote_audio``; any scheme but http/https),
            or a chained Ogg file whose links differ in sample rate; a remote server did not
            answer within ``network_timeout_s``.
    """
    name = _describe(source, hint)
    scheme = _url_scheme(source)
    if scheme is not None:
        url = _check_url(source, scheme, name, config)
        try:
            result = _decode_pyav(url, config)
        except Exception as exc:  # noqa: BLE001 - _Fatal or not, PyAV is the only backend here
            raise AudioDecodeError(name, f"pyav: {_remote_msg(exc, config)}") from exc
        samples, sample_rate = result.samples, result.sample_rate
    else:
        local = _local(source)
        ext = _extension(source, hint)
        head = _local_head(local, name)
        links = _ogg_links(local) if head.startswith(b"OggS") and ext not in _RAW_EXTENSIONS else []
        if len(links) > 1:
            samples, sample_rate = _decode_chained(local, links, ext, name, config)
        else:
            samples, sample_rate = _run_backends(local, ext, name, config, head)

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
    offset_s: float | None = None,
    duration_s: float | None = None,
    reader: "SegmentReader | None" = None,
) -> np.ndarray:
    """Decode (:func:`decode_audio`) and resample (:func:`resample`) to ``target_rate``.

    With ``offset_s`` (seconds, a segment of a long recording) only the segment
    ``[offset_s, offset_s + duration_s)`` is decoded (:func:`decode_segment`, through ``reader``
    if given, which keeps files open) and the cut segment is resampled like a whole clip: the
    result is ``resample(decode_audio(source)[0][a:a + m], ...)`` with ``a = round(offset_s *
    sr)``, ``m = round(duration_s * sr)`` at the file's native rate ``sr``.

    Returns:
        float32 array of shape ``(n,)`` at ``target_rate`` Hz, nominally in [-1, 1].

    Raises:
        AudioDecodeError: as :func:`decode_audio` (:func:`decode_segment` for a segment).
        ValueError: ``duration_s`` without ``offset_s`` or the other way round.
    """
    if offset_s is not None or duration_s is not None:
        if offset_s is None or duration_s is None:
            raise ValueError("a segment needs both offset_s and duration_s")
        samples, sample_rate = decode_segment(source, offset_s, duration_s, hint=hint, config=config, reader=reader)
    else:
        samples, sample_rate = decode_audio(source, hint=hint, config=config)
    return resample(samples, sample_rate, target_rate, quality=config.resample_quality)


def _probe_soundfile(source: _Local, ext: str) -> float:
    if ext in _RAW_EXTENSIONS:
        return _size(source) // 2 / _RAW_KWARGS["samplerate"]
    with _sf_input(source, None) as target:
        info = sf.info(target)
    frames = info.frames
    if info.format == "FLAC" and info.samplerate > 0:  # the last frame tells, not STREAMINFO
        fl = _flac_length(source, _read_head(source))
        if fl is not None and fl.true_length is not None:
            frames = fl.true_length
    if info.samplerate <= 0 or info.channels <= 0 or frames <= 0:
        raise ValueError(f"header gives frames={frames}, rate={info.samplerate}")
    if frames >= _UNKNOWN_FRAMES:
        raise ValueError("header gives no length")
    _check_rate_channels(int(info.samplerate), int(info.channels))
    return frames / info.samplerate


def _probe_pyav(source: _Local, config: DecodeConfig) -> float:
    import av

    with _pyav_container(source, config) as container:
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


def _probe_backends(source: _Local, ext: str, name: str, config: DecodeConfig) -> float:
    failures: list[str] = []
    last_exc: BaseException | None = None

    def repaired() -> float:
        if not looks_like_ogg_opus(_read_head(source)):
            raise OggRepairError("not an Ogg/Opus stream")
        return _probe_soundfile(repair_missing_opustags(_read_file(source)), ".opus")

    backends = [("soundfile", lambda: _probe_soundfile(source, ext)), ("ogg-opus-repair", repaired)]
    if config.ffmpeg_fallback:
        backends.append(("pyav", lambda: _probe_pyav(source, config)))
    for backend, run in backends:
        try:
            duration = float(run())
            if duration > 0 and math.isfinite(duration):
                return duration
            raise ValueError(f"non-positive duration {duration}")
        except _Fatal as exc:
            raise AudioDecodeError(name, f"{backend}: {_msg(exc)}") from exc
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{backend}: {_msg(exc)}")
            last_exc = exc
    raise AudioDecodeError(name, "; ".join(failures)) from last_exc


def probe_duration(source: Source, *, hint: str | None = None,
                   config: DecodeConfig = DecodeConfig()) -> float:
    """Duration in seconds read from the headers, without decoding the audio.

    Tries ``soundfile.info`` (for ``.raw``/``.pcm``: file size / 2 bytes / 16 kHz), then the same
    on an OpusTags-repaired copy of an Ogg/Opus stream, then PyAV's stream/container duration
    (if ``config.ffmpeg_fallback``). A FLAC's length comes from its last frame header when that
    one is valid (STREAMINFO may under- or over-claim); a chained Ogg file's is the sum of its
    links. Other headers may over-claim for damaged files (e.g. a truncated MP3 with a Xing
    header). What is opened follows the same rules as :func:`decode_audio`.

    Args:
        source: a path or the raw container bytes (an http/https URL with
            ``config.remote_audio``).
        hint: file name/extension hint for bytes input.
        config: decoder options (``ffmpeg_fallback``, ``remote_audio``, ``network_timeout_s``).

    Returns:
        Duration in seconds (float, > 0).

    Raises:
        AudioDecodeError: no backend can tell the duration, the source is empty, or it must not be opened
            (see :func:`decode_audio`).
    """
    name = _describe(source, hint)
    scheme = _url_scheme(source)
    if scheme is not None:
        url = _check_url(source, scheme, name, config)
        try:
            return float(_probe_pyav(url, config))
        except Exception as exc:  # noqa: BLE001
            raise AudioDecodeError(name, f"pyav: {_remote_msg(exc, config)}") from exc
    local = _local(source)
    ext = _extension(source, hint)
    head = _local_head(local, name)
    links = _ogg_links(local) if head.startswith(b"OggS") and ext not in _RAW_EXTENSIONS else []
    if len(links) > _MAX_OGG_LINKS:
        raise AudioDecodeError(name, f"chained Ogg file with more than {_MAX_OGG_LINKS} links")
    if len(links) > 1:
        return math.fsum(_probe_backends(_link(local, a, b), ext, name, config) for a, b in links)
    return _probe_backends(local, ext, name, config)


# --------------------------------------------------------------------------- segments

#: PyAV: seconds decoded before a segment's start (AAC/Opus/Vorbis decoders need the frames
#: before; lossless ones do not care).
_PYAV_PREROLL_S = 0.5
#: Read on (and drop) instead of seeking when the segment starts at most this far after the
#: open file's position: consecutive segments of one file then decode as one stream.
_READ_ON_S = 0.25


class _PastEnd(_Fatal):
    pass


def _segment_range(offset_s: float, duration_s: float, sample_rate: int) -> tuple[int, int]:
    """``(start, n)`` samples at ``sample_rate``: ``round(offset_s * sr)``, ``round(duration_s * sr)``."""
    return int(round(offset_s * sample_rate)), int(round(duration_s * sample_rate))


def _to_mono(block: np.ndarray) -> np.ndarray:
    return block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)


class _SoundfileHandle:
    """An open libsndfile stream (FLAC/MP3 length corrections applied) for segment reads."""

    backend = "soundfile"

    def __init__(self, local: _Local, ext: str, head: bytes):
        self._stack = contextlib.ExitStack()
        try:
            raw = ext in _RAW_EXTENSIONS
            overlay = None
            if not raw:
                # The whole file's true length (a segment is never capped by the file's length):
                # FLAC from its last frame header, MP3 from walking its frame headers once per open.
                overlay = _flac_overlay(_flac_length(local, head)) or _mp3_overlay(local, head, DecodeConfig())
            target = self._stack.enter_context(_sf_input(local, overlay))
            self.file = self._stack.enter_context(
                sf.SoundFile(target, mode="r", **(_RAW_KWARGS if raw else {})))
            self.sample_rate, self.channels = int(self.file.samplerate), int(self.file.channels)
            _check_rate_channels(self.sample_rate, self.channels)
            if not self.file.seekable():
                raise ValueError("the stream is not seekable")
        except BaseException:
            self._stack.close()
            raise
        frames = int(self.file.frames)
        self.frames = frames if 0 < frames < _UNKNOWN_FRAMES else None
        lossy = str(self.file.subtype) in _PREROLL_SUBTYPES
        self.preroll = int(round(SEEK_PREROLL_S * self.sample_rate)) if lossy else 0

    def read(self, start: int, n: int, stats: dict) -> np.ndarray:
        f = self.file
        if self.frames is not None and start >= self.frames:
            raise _PastEnd(f"starts at sample {start}, past the end of the file ({self.frames} samples, "
                           f"{self.frames / self.sample_rate:.3f} s)")
        pos = f.tell()
        # Read on where that is exact: not MP3, whose decoder corrupts some read boundaries
        # (see _decode_soundfile); a seek with pre-roll and one read is exact there.
        if not self.preroll and pos <= start <= pos + int(_READ_ON_S * self.sample_rate):
            first = pos  # read on: exactly a decode from the start
        else:
            first = start - min(start, self.preroll)
            f.seek(first)
            stats["seeks"] += 1
        data = f.read(frames=start - first + n, dtype="float32", always_2d=True)
        stats["frames_decoded"] += int(data.shape[0])
        samples = _to_mono(data[start - first:])
        if samples.size == 0:
            raise _PastEnd(f"starts at sample {start}, past the end of the file")
        return samples

    def close(self) -> None:
        self._stack.close()


class _PyAVHandle:
    """An open PyAV container for segment reads: seek to a keyframe before the segment (minus a
    pre-roll), decode on, place frames by their timestamps and trim to the sample."""

    backend = "pyav"

    def __init__(self, local: _Local | str, config: DecodeConfig):
        self._stack = contextlib.ExitStack()
        try:
            self.container = self._stack.enter_context(_pyav_container(local, config))
            if not self.container.streams.audio:
                raise ValueError("no audio stream")
            self.stream = self.container.streams.audio[0]
            self.sample_rate = int(self.stream.codec_context.sample_rate or self.stream.rate or 0)
            _check_rate_channels(self.sample_rate, int(self.stream.codec_context.channels or 1))
            # Where sample 0 of a decode from the start is: the first decoded frame's timestamp.
            # Also the frame grid: the length of the first two frames (the second starts right
            # after the first), to place frames where timestamps are coarser than a sample.
            self.origin, sizes = None, []
            for packet in self.container.demux(self.stream):
                for frame in packet.decode():
                    if not frame.samples:
                        continue
                    if self.origin is None:
                        if frame.pts is None or frame.time_base is None:
                            raise ValueError("the container gives no timestamps, so a segment cannot be placed")
                        self.origin = Fraction(frame.pts) * frame.time_base
                    sizes.append(int(frame.samples))
                if len(sizes) >= 2:
                    break
            if self.origin is None:
                raise ValueError("no audio frames")
            self.grid = (sizes[0], sizes[1]) if len(sizes) >= 2 else None
        except BaseException:
            self._stack.close()
            raise
        self.frames = None
        self.preroll = int(round(_PYAV_PREROLL_S * self.sample_rate))

    def read(self, start: int, n: int, stats: dict) -> np.ndarray:
        for attempt in range(2):
            target = 0 if attempt else start - min(start, self.preroll)
            got = self._read_from(target, start, n, stats)
            if got is not None:
                return got
        raise ValueError(f"seeking before sample {start} landed after it (container timestamps are unreliable)")

    def _read_from(self, target: int, start: int, n: int, stats: dict) -> np.ndarray | None:
        stream, sr = self.stream, self.sample_rate
        pts = math.floor((Fraction(target, sr) + self.origin) / stream.time_base)
        self.container.seek(pts, stream=stream, backward=True, any_frame=False)
        stats["seeks"] += 1
        blocks: list[np.ndarray] = []
        pos: int | None = None  # sample index of the next decoded sample
        end = start + n
        for packet in self.container.demux(stream):
            for frame in packet.decode():
                if frame.samples == 0:
                    continue
                if pos is None:
                    if frame.pts is None or frame.time_base is None:
                        raise ValueError("the container gives no timestamps, so a segment cannot be placed")
                    if int(frame.sample_rate or sr) != sr:
                        raise ValueError(f"the stream changes its sample rate ({sr} -> {frame.sample_rate} Hz)")
                    pos = self._place(Fraction(frame.pts) * frame.time_base - self.origin, frame)
                    if pos > start:
                        return None  # landed after the segment's start
                stats["frames_decoded"] += frame.samples
                lo, hi = max(start - pos, 0), min(end - pos, frame.samples)
                if lo < hi:
                    blocks.append(_frame_to_mono(frame)[lo:hi])
                pos += frame.samples
                if pos >= end:
                    return np.concatenate(blocks).astype(np.float32, copy=False)
        if not blocks:
            raise _PastEnd(f"starts at sample {start}, past the end of the file"
                           + (f" ({pos} samples, {pos / sr:.3f} s)" if pos is not None else ""))
        return np.concatenate(blocks).astype(np.float32, copy=False)

    def _place(self, seconds: Fraction, frame) -> int:
        """The sample index of a frame that starts ``seconds`` after sample 0.

        Where the time base is coarser than a sample (Matroska/WebM: 1 ms), the frame goes to the
        nearest start on the stream's frame grid (frames of the second frame's length after the
        first one), if that is within half a tick of the timestamp: exact for codecs with one
        frame length (fixed-blocksize FLAC, AAC, MP3, Opus at one frame duration).
        """
        sr = self.sample_rate
        pos = round(seconds * sr)
        tick = self.stream.time_base * sr  # samples per time-base unit
        if tick > 1 and self.grid is not None and frame.samples == self.grid[1] and pos > self.grid[0]:
            first, size = self.grid
            snapped = first + round(Fraction(pos - first, size)) * size
            if abs(snapped - seconds * sr) <= tick / 2 + 1:
                return snapped
        return pos

    def close(self) -> None:
        self._stack.close()


class SegmentReader:
    """Decodes segments of (long) recordings, keeping the last ``max_open`` files open.

    A segment is the samples ``[round(offset_s * sr), round(offset_s * sr) + round(duration_s *
    sr))`` of the file at its native rate ``sr`` (Python ``round``: half to even), channels
    averaged, exactly what :func:`decode_audio` of the whole file would give for that range.
    Only the segment is decoded:

    * **soundfile** (WAV, FLAC, Ogg/Vorbis, Ogg/Opus, MP3, AIFF, ...): ``SoundFile.seek`` then
      ``read``. MP3 seeks :data:`SEEK_PREROLL_S` before the start and drops those samples (its
      decoder needs the frames before). A segment that starts at most 0.25 s (or the pre-roll)
      after where the last read of that file ended is read on without a seek, so segments in
      file order decode the file once, as one stream.
    * **PyAV** (M4A/AAC, Matroska/WebM, ... when libsndfile cannot open the file, with
      ``config.ffmpeg_fallback``): ``container.seek`` to a keyframe at least 0.5 s before the
      start, decode on, place the first frame by its timestamp and count samples from there,
      trimming to the sample. Exact where the container's timestamps resolve samples (MP4
      time base 1/rate; Matroska's milliseconds when the codec's frames last whole ms).

    Files are keyed by path, size and mtime, so a replaced file is opened again; embedded
    bytes are opened for one call. Chained Ogg files are refused (libsndfile would seek within
    the first link only). OpusTags-less Ogg/Opus files go to PyAV (no in-memory repair).

    Attributes:
        stats: ``{"opens", "seeks", "frames_decoded"}`` counters since creation
            (``frames_decoded``: frames the decoders produced, pre-roll and skipped frames included).

    Not thread-safe; one per worker process. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, max_open: int = 8):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open!r}")
        self.max_open = int(max_open)
        self._open: dict[tuple, object] = {}  # insertion order = least recently used first
        self.stats = {"opens": 0, "seeks": 0, "frames_decoded": 0}

    def __enter__(self) -> "SegmentReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # pickles (e.g. into DataLoader workers) without open files
        return {"max_open": self.max_open, "_open": {}, "stats": dict.fromkeys(self.stats, 0)}

    def close(self) -> None:
        """Close every open file."""
        handles, self._open = list(self._open.values()), {}
        for handle in handles:
            with contextlib.suppress(Exception):
                handle.close()

    def _drop(self, key: tuple | None, handle) -> None:
        if key is not None:
            self._open.pop(key, None)
        with contextlib.suppress(Exception):
            handle.close()

    def _open_handle(self, source: Source, hint: str | None, name: str, config: DecodeConfig):
        scheme = _url_scheme(source)
        if scheme is not None:
            url = _check_url(source, scheme, name, config)
            try:
                return _PyAVHandle(url, config)
            except Exception as exc:  # noqa: BLE001
                raise AudioDecodeError(name, f"pyav: {_remote_msg(exc, config)}") from exc
        local = _local(source)
        ext = _extension(source, hint)
        head = _local_head(local, name)
        if head.startswith(b"OggS") and ext not in _RAW_EXTENSIONS:
            links = _ogg_links(local)
            if len(links) > 1:
                raise AudioDecodeError(name, f"chained Ogg file ({len(links)} links): segments of chained "
                                             "files are not supported (re-encode it as one stream)")
        failures: list[str] = []
        last: BaseException | None = None
        openers: list[tuple[str, Callable[[], object]]] = [("soundfile", lambda: _SoundfileHandle(local, ext, head))]
        if config.ffmpeg_fallback:
            openers.append(("pyav", lambda: _PyAVHandle(local, config)))
        for backend, opener in openers:
            try:
                return opener()
            except _Fatal as exc:
                raise AudioDecodeError(name, f"{backend}: {_msg(exc)}") from exc
            except Exception as exc:  # noqa: BLE001 - every backend failure is reported
                failures.append(f"{backend}: {_msg(exc)}")
                last = exc
        if not config.ffmpeg_fallback:
            failures.append("pyav: disabled (ffmpeg_fallback=False)")
        raise AudioDecodeError(name, "; ".join(failures)) from last

    def _key(self, source: Source, hint: str | None, config: DecodeConfig) -> tuple | None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return None
        path = os.fspath(source)
        options = (_extension(source, hint), config.ffmpeg_fallback, config.remote_audio)
        if _url_scheme(source) is not None:
            return (path, *options)
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None  # the open reports it
        return (path, st.st_size, st.st_mtime_ns, *options)

    def decode(self, source: Source, offset_s: float, duration_s: float, *, hint: str | None = None,
               config: DecodeConfig = DecodeConfig()) -> tuple[np.ndarray, int]:
        """The segment ``[offset_s, offset_s + duration_s)`` seconds of ``source``.

        Args:
            source: as :func:`decode_audio` (a local path, container bytes, or an http(s) URL
                with ``config.remote_audio``).
            offset_s: start in seconds from the start of the file (finite, >= 0).
            duration_s: length in seconds (finite, > 0).
            hint: as :func:`decode_audio`.
            config: decoder options; ``max_duration_s`` caps the *segment* (refused before
                anything is decoded), never the file.

        Returns:
            ``(samples, sample_rate)``: float32 ``(n,)`` at the file's native rate, with
            ``n = round(duration_s * sample_rate)``, or fewer when the file ends inside the
            segment (the caller's duration tolerance decides whether that is usable).

        Raises:
            AudioDecodeError: a negative, non-finite or empty segment; a segment longer than
                ``max_duration_s``; one that starts at or past the end of the file; a file no
                backend can open or seek in (a chained Ogg file, a container without
                timestamps); NaN/Inf samples; and what :func:`decode_audio` refuses to open.
        """
        name = _describe(source, hint)
        where = f"segment at {offset_s!r} s for {duration_s!r} s"
        if not (isinstance(offset_s, (int, float)) and math.isfinite(offset_s) and offset_s >= 0):
            raise AudioDecodeError(name, f"{where}: the offset must be a finite number of seconds >= 0")
        if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
            raise AudioDecodeError(name, f"{where}: the duration must be a finite number of seconds > 0")
        key = self._key(source, hint, config)
        handle = self._open.pop(key, None) if key is not None else None
        if handle is None:
            handle = self._open_handle(source, hint, name, config)
            self.stats["opens"] += 1
        keep = key is not None
        try:
            sr = handle.sample_rate
            start, n = _segment_range(offset_s, duration_s, sr)
            if n < 1:
                raise AudioDecodeError(name, f"{where}: shorter than one sample at {sr} Hz")
            limit = _max_frames(sr, config.max_duration_s)
            if limit is not None and n > limit:  # the cap is the segment's: refused before decoding
                raise AudioDecodeError(name, f"{where}: longer than max_duration_s={config.max_duration_s} s "
                                             f"({n / sr:.3f} s)")
            try:
                samples = handle.read(start, n, self.stats)
            except _PastEnd as exc:
                raise AudioDecodeError(name, f"{where}: {_msg(exc)}") from exc
            except Exception as exc:  # noqa: BLE001 - the stream is in an unknown state: closed
                keep = False
                raise AudioDecodeError(name, f"{handle.backend}: {where}: {_msg(exc)}") from exc
        finally:
            if keep:
                self._open[key] = handle  # most recently used last
                while len(self._open) > self.max_open:
                    old = next(iter(self._open))
                    self._drop(old, self._open[old])
            else:
                self._drop(None, handle)
        bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
        if bad:
            raise AudioDecodeError(name, f"{where}: {bad} of {samples.size} samples are non-finite (NaN/Inf)")
        return samples, sr


def decode_segment(source: Source, offset_s: float, duration_s: float, *, hint: str | None = None,
                   config: DecodeConfig = DecodeConfig(),
                   reader: SegmentReader | None = None) -> tuple[np.ndarray, int]:
    """Decode only the segment ``[offset_s, offset_s + duration_s)`` seconds of ``source``.

    See :class:`SegmentReader` (which seeks, which samples, which files stay open);
    with ``reader`` None the file is opened for this call only.

    Returns:
        ``(samples, sample_rate)``: float32 ``(n,)`` at the native rate, ``n = round(duration_s *
        sample_rate)`` (fewer when the file ends inside the segment).

    Raises:
        AudioDecodeError: as :meth:`SegmentReader.decode`.
    """
    if reader is not None:
        return reader.decode(source, offset_s, duration_s, hint=hint, config=config)
    with SegmentReader(max_open=1) as own:
        return own.decode(source, offset_s, duration_s, hint=hint, config=config)
