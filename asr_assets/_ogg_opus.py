"""In-memory repair of Ogg/Opus streams whose OpusTags header packet is missing.

An Ogg Opus stream (RFC 7845) must start with an ``OpusHead`` packet on its own page, followed
by an ``OpusTags`` packet. Some writers drop the ``OpusTags`` packet; libsndfile and FFmpeg both
reject such a stream. :func:`repair_missing_opustags` inserts a minimal ``OpusTags`` page after
the ``OpusHead`` page, renumbers the page sequence numbers of that logical stream and recomputes
every changed page's CRC, so the result decodes with any conforming decoder.

Entry points:
    looks_like_ogg_opus(head) -> bool
    repair_missing_opustags(data) -> bytes
"""

from __future__ import annotations

import struct

__all__ = ["looks_like_ogg_opus", "repair_missing_opustags", "ogg_crc32", "OggRepairError"]

_SNIFF_BYTES = 64 * 1024
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, seqno, crc, nseg
_BOS = 0x02
_VENDOR = b"asr_assets"


class OggRepairError(ValueError):
    """The data is not an Ogg/Opus stream this module can repair (or does not need repair)."""


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def ogg_crc32(data: bytes) -> int:
    """Ogg page CRC-32: polynomial 0x04C11DB7, no reflection, initial value 0, no final xor.

    Args:
        data: the whole page with its CRC field (bytes 22..25) set to zero.

    Returns:
        The CRC as an unsigned 32-bit int.
    """
    crc = 0
    table = _CRC_TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ b) & 0xFF]
    return crc


def looks_like_ogg_opus(head: bytes) -> bool:
    """True if the first 64 KiB of ``head`` contain both ``b"OggS"`` and ``b"OpusHead"``."""
    head = head[:_SNIFF_BYTES]
    return b"OggS" in head and b"OpusHead" in head


class _Page:
    __slots__ = ("version", "htype", "granule", "serial", "seqno", "segments", "body")

    def __init__(self, version, htype, granule, serial, seqno, segments, body):
        self.version, self.htype, self.granule = version, htype, granule
        self.serial, self.seqno, self.segments, self.body = serial, seqno, segments, body

    def to_bytes(self) -> bytes:
        raw = bytearray(
            _HEADER.pack(b"OggS", self.version, self.htype, self.granule, self.serial,
                         self.seqno, 0, len(self.segments))
        )
        raw += self.segments
        raw += self.body
        struct.pack_into("<I", raw, 22, ogg_crc32(raw))
        return bytes(raw)


def _parse_pages(data: bytes) -> list[tuple[_Page, bytes]]:
    """Split ``data`` into pages; each item is (parsed page, original raw bytes)."""
    pages = []
    pos = data.find(b"OggS")
    if pos < 0:
        raise OggRepairError("no Ogg page found")
    n = len(data)
    while pos + _HEADER.size <= n:
        if data[pos:pos + 4] != b"OggS":
            nxt = data.find(b"OggS", pos + 1)  # resync after garbage
            if nxt < 0:
                break
            pos = nxt
            continue
        _, ver, htype, gran, serial, seqno, _crc, nseg = _HEADER.unpack_from(data, pos)
        seg_start = pos + _HEADER.size
        segments = data[seg_start:seg_start + nseg]
        body_len = sum(segments)
        end = seg_start + nseg + body_len
        if len(segments) < nseg or end > n:
            break  # truncated final page: drop it
        page = _Page(ver, htype, gran, serial, seqno, segments, data[seg_start + nseg:end])
        pages.append((page, data[pos:end]))
        pos = end
    if not pages:
        raise OggRepairError("no complete Ogg page found")
    return pages


def _opustags_page(serial: int, seqno: int) -> _Page:
    packet = b"OpusTags" + struct.pack("<I", len(_VENDOR)) + _VENDOR + struct.pack("<I", 0)
    # A packet shorter than 255 bytes is one lacing value, which also terminates the packet.
    return _Page(0, 0, 0, serial, seqno, bytes([len(packet)]), packet)


def repair_missing_opustags(data: bytes) -> bytes:
    """Return a copy of ``data`` with a minimal OpusTags page inserted after OpusHead.

    The inserted page carries ``b"OpusTags"``, a u32 vendor length, the vendor string
    ``b"asr_assets"`` and a u32 comment count of 0, with granule position 0. All pages of the Opus
    logical stream after the ``OpusHead`` page are renumbered consecutively and get fresh CRCs;
    pages of other logical streams are copied unchanged.

    Args:
        data: the complete Ogg file as bytes.

    Returns:
        The repaired Ogg bytes.

    Raises:
        OggRepairError: not an Ogg/Opus stream, the OpusHead page is not a lone packet, or the
            OpusTags packet is already present (nothing to repair).
    """
    if not looks_like_ogg_opus(data):
        raise OggRepairError("not an Ogg/Opus stream")
    pages = _parse_pages(data)
    head_idx = next(
        (i for i, (p, _) in enumerate(pages) if p.htype & _BOS and p.body.startswith(b"OpusHead")),
        None,
    )
    if head_idx is None:
        raise OggRepairError("no OpusHead beginning-of-stream page")
    head = pages[head_idx][0]
    serial = head.serial
    if len(head.segments) == 0 or head.segments[-1] == 255:
        raise OggRepairError("OpusHead page does not end a packet")
    following = [p for p, _ in pages[head_idx + 1:] if p.serial == serial]
    if following and following[0].body.startswith(b"OpusTags"):
        raise OggRepairError("OpusTags packet present; nothing to repair")

    # Insert after the run of BOS pages at the start (all BOS pages precede secondary headers).
    insert_at = head_idx + 1
    while insert_at < len(pages) and pages[insert_at][0].htype & _BOS:
        insert_at += 1

    out = bytearray()
    seq = head.seqno
    for i, (page, raw) in enumerate(pages):
        if i == insert_at:
            seq += 1
            out += _opustags_page(serial, seq).to_bytes()
        if page.serial == serial and i > head_idx:
            seq += 1
            if page.seqno != seq:
                page.seqno = seq
                raw = page.to_bytes()
        out += raw
    if insert_at == len(pages):
        out += _opustags_page(serial, seq + 1).to_bytes()
    return bytes(out)
