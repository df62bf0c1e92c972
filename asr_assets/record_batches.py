"""Records from manifest batches: upstream's normalization, filters and splits, vectorized.

Entry points:
    - :func:`normalize_transcripts` — :func:`asr_assets.records.normalize_transcript` on a list,
      as polars string expressions.
    - :func:`transcript_counts` — per normalized transcript: code points, symbols, alphanumerics,
      non-whitespace characters and words (what the filters of spec §1.6 need).
    - :class:`DigestClaims` — which row first carried each utterance id, ~53 bytes per id.
    - :class:`BatchRecordBuilder` — a :class:`~asr_assets.manifest_batches.ManifestBatch` ->
      per split, in row order, its records as columns and its :class:`~asr_assets.records.Rejection` (:class:`SplitRecords`).

:func:`asr_assets.records.build_records` stays the reference: the same rows give the same
records, splits, stages and reasons (the tests run both on hostile and generated rows).

Exactness: the character classes (``str.isspace``, ``str.isalnum``) are built from this
Python's own Unicode tables at first use and handed to the regex engine as explicit code-point
ranges, so polars never applies its own (Rust) notion of whitespace or alphanumerics.
Lowercasing (off by default) runs through Python's ``str.lower``. Utterance ids are compared by
their BLAKE2b-128 digest: two different ids colliding is as unlikely as a SHA-256 blob name
collision (about 1e-24 for 10 million ids).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from stat import S_ISREG
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .manifest_batches import ManifestBatch
from .record_cache import RecordColumns
from .storage import is_url
from .manifests import ManifestRow
from .records import (
    SPLITS,
    RecordConfig,
    Rejection,
    _inside,
    assign_split,
    normalize_transcript,
)

_TRANSLATE_FROM = ["\u2019", "`", "\u02bc", "\u201c", "\u201d", "\u00ab", "\u00bb"]
_TRANSLATE_TO = ["'", "'", "'", '"', '"', '"', '"']


@functools.cache
def _code_points() -> tuple[tuple[int, str], ...]:
    return tuple((first, "".join(map(chr, range(first, last + 1)))) for first, last in ((0, 0xD7FF), (0xE000, 0x10FFFF)))


def _ranges(pattern: str) -> str:
    """Regex character-class body of the code points (surrogates excluded) that the one-character
    Python ``re`` pattern ``pattern`` matches, as ``\\x{..}-\\x{..}`` ranges.

    Python's ``re`` classifies with ``str``'s own predicates: ``\\s`` is ``str.isspace`` and
    ``[^\\W_]`` is ``str.isalnum`` (``_sre``: ``Py_UNICODE_ISSPACE``, ``Py_UNICODE_ISALNUM``).
    """
    out = []
    for first, text in _code_points():
        for match in re.finditer(f"(?:{pattern})+", text):
            a, b = first + match.start(), first + match.end() - 1
            out.append(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}")
    return "".join(out)


@functools.cache
def _classes() -> dict[str, str]:
    space, alnum, plain = _ranges(r"\s"), _ranges(r"[^\W_]"), _ranges(r"[^\W_]|[\s'\-]")
    return {
        "space_chars": "".join(c for c in map(chr, range(0x3001)) if c.isspace()),
        "space": f"[{space}]",
        "space_run": f"[{space}]+",
        "word": f"[^{space}]+",
        "alnum": f"[{alnum}]",
        "plain": f"[{plain}]",
    }


def _normalized_expr(column: pl.Expr) -> pl.Expr:
    c = _classes()
    text = column.str.strip_chars(c["space_chars"])
    text = text.str.replace_many(_TRANSLATE_FROM, _TRANSLATE_TO)
    text = text.str.replace_all(c["space_run"], " ")
    # Whitespace runs are single spaces now: `\s+([,.;:!?])` -> `\1` is " ([,.;:!?])" -> "$1".
    return text.str.replace_all(" ([,.;:!?])", "${1}")


def normalize_transcripts(texts: Sequence[str], *, lowercase: bool = False) -> list[str]:
    """``[normalize_transcript(t, lowercase=lowercase) for t in texts]``, vectorized."""
    if lowercase:  # Python's casing rules (final sigma, İ, ...) are not the regex engine's
        return [normalize_transcript(t, lowercase=True) for t in texts]
    frame = pl.DataFrame({"t": pl.Series(texts, dtype=pl.String)})
    return frame.select(_normalized_expr(pl.col("t"))).to_series().to_list()


def normalize_and_count(texts: Sequence[str], *, lowercase: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    """:func:`normalize_transcripts` and :func:`transcript_counts` of the result, in one pass."""
    normalized, counts = _normalize_and_count(texts, lowercase=lowercase)
    return normalized.to_list(), counts


def _normalize_and_count(texts: Sequence[str], *, lowercase: bool = False) -> tuple[pl.Series, dict[str, np.ndarray]]:
    """:func:`normalize_and_count` with the normalized transcripts as a polars String series
    (what the record writer takes: no Python string per transcript)."""
    if lowercase or not texts:
        normalized = pl.Series("t", normalize_transcripts(texts, lowercase=lowercase), dtype=pl.String)
        return normalized, _counts(normalized.to_frame())
    frame = pl.DataFrame({"t": pl.Series(texts, dtype=pl.String)}).select(t=_normalized_expr(pl.col("t")))
    return frame["t"], _counts(frame)


def _counts(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    c = _classes()
    col = pl.col("t")
    counted = frame.select(
        chars=col.str.len_chars(), plain=col.str.count_matches(c["plain"]),
        alnum=col.str.count_matches(c["alnum"]), space=col.str.count_matches(c["space"]),
        words=col.str.count_matches(c["word"]))
    out = {name: counted[name].fill_null(0).to_numpy().astype(np.int64) for name in counted.columns}
    out["symbols"] = out["chars"] - out.pop("plain")
    out["nonspace"] = out["chars"] - out.pop("space")
    return out


def transcript_counts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per (normalized) transcript, as int64 arrays: ``chars`` (code points), ``symbols`` (not
    alphanumeric, whitespace, ``'`` or ``-``), ``alnum``, ``nonspace`` and ``words``
    (``len(t.split())``)."""
    return _counts(pl.DataFrame({"t": pl.Series(texts, dtype=pl.String)}))


def filter_reason(n: int, symbols: int, alnum: int, chars: int, words: int, duration: float,
                  config: RecordConfig) -> str | None:
    """:func:`asr_assets.records._filter` from the counts of :func:`transcript_counts`."""
    if duration < config.min_audio_duration_s:
        return f"duration {duration:.6g} s < min {config.min_audio_duration_s} s"
    if duration > config.max_audio_duration_s:
        return f"duration {duration:.6g} s > max {config.max_audio_duration_s} s"
    if n < config.min_transcript_chars or n > config.max_transcript_chars:
        return f"transcript length {n} outside [{config.min_transcript_chars}, {config.max_transcript_chars}]"
    ratio = symbols / n if n else 0.0
    if ratio > config.max_symbol_ratio:
        return f"symbol ratio {ratio:.2f} > {config.max_symbol_ratio}"
    if not alnum:
        return "transcript has no alphanumeric character"
    cps, wps = chars / duration, words / duration
    if not config.min_chars_per_second <= cps <= config.max_chars_per_second:
        return f"{cps:.1f} chars/s outside [{config.min_chars_per_second}, {config.max_chars_per_second}]"
    if not config.min_words_per_second <= wps <= config.max_words_per_second:
        return f"{wps:.1f} words/s outside [{config.min_words_per_second}, {config.max_words_per_second}]"
    per_char, per_word = duration / chars, duration / words
    if not config.min_duration_per_char <= per_char <= config.max_duration_per_char:
        return f"{per_char:.3f} s per char outside [{config.min_duration_per_char}, {config.max_duration_per_char}]"
    if not config.min_duration_per_word <= per_word <= config.max_duration_per_word:
        return f"{per_word:.3f} s per word outside [{config.min_duration_per_word}, {config.max_duration_per_word}]"
    return None


def _halves(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last 8 bytes of each 16-byte digest as native ``uint64`` (big-endian read,
    so ``(high, low)`` sorts as the bytes do)."""
    words = digests.view(">u8").reshape(-1, 2)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


class DigestClaims:
    """Which row first carried each utterance id, in discovery order, for whole batches.

    Ids are kept as BLAKE2b-128 digests in sorted runs (merged as they grow, like an LSM tree)
    with the claiming row's manifest, row number, line and split: about 53 bytes per id and no
    Python object per id. Each run also keeps its digests' first 8 bytes as ``uint64`` (their
    order is the digests' order), so look-ups and sorts compare integers, not 16-byte strings.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (sorted digests "S16", their
        # first 8 bytes as uint64, ordinals int64)
        self.count = 0
        self.manifests: list[str] = []
        self._manifest_index: dict[str, int] = {}
        self._info_starts: list[int] = []
        self._info: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # manifest, rows, lines, splits

    @staticmethod
    def digests(keys: Sequence[str]) -> np.ndarray:
        blake = hashlib.blake2b
        return np.frombuffer(b"".join([blake(k.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                                       for k in keys]), dtype="S16")

    def claim(self, keys: Sequence[str], manifest: str, row_numbers: Sequence[int], file_rows: Sequence[int],
              splits: Sequence[str]) -> list[dict | None]:
        """Claim ``keys`` (one batch of rows of ``manifest``, in order); per row None if it is the
        first with its key, else the first row's ``{"manifest", "row", "line", "split"}``."""
        n = len(keys)
        if not n:
            return []
        digest = self.digests(keys)
        owner = np.full(n, -1, dtype=np.int64)
        high, low = _halves(digest)
        for run_keys, run_high, run_ordinals in self.runs:
            pos = np.searchsorted(run_high, high)
            pos[pos == len(run_keys)] = 0
            hit = run_keys[pos] == digest
            again = np.flatnonzero(~hit & (run_high[pos] == high))  # same first 8 bytes, not (yet) the digest
            if len(again):
                exact = np.searchsorted(run_keys, digest[again])
                exact[exact == len(run_keys)] = 0
                pos[again] = exact
                hit[again] = run_keys[exact] == digest[again]
            owner[hit] = run_ordinals[pos[hit]]
        order = np.lexsort((low, high))  # stable, in the digests' byte order
        ordered = digest[order]
        starts = np.ones(n, dtype=bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        first_sorted = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        first = np.empty(n, dtype=np.int64)
        first[order] = order[first_sorted]
        new = (owner < 0) & (first == np.arange(n))
        new_index = np.flatnonzero(new)
        ordinals = np.full(n, -1, dtype=np.int64)
        ordinals[new_index] = self.count + np.arange(len(new_index))
        later = (owner < 0) & ~new
        owner[later] = ordinals[first[later]]
        if len(new_index):
            m = self._manifest_index.get(manifest)
            if m is None:
                m = self._manifest_index[manifest] = len(self.manifests)
                self.manifests.append(manifest)
            codes = {s: c for c, s in enumerate(SPLITS)}
            split_codes = np.array([codes.get(s, len(SPLITS)) for s in splits], dtype=np.uint8)
            self._info_starts.append(self.count)
            self._info.append((m, np.asarray(row_numbers, dtype=np.int64)[new_index],
                               np.asarray(file_rows, dtype=np.int64)[new_index], split_codes[new_index]))
            sort = new_index[np.lexsort((low[new_index], high[new_index]))]
            self.runs.append((digest[sort], high[sort], ordinals[sort]))
            self.count += len(new_index)
            self._merge()
        out: list[dict | None] = [None] * n
        for i in np.flatnonzero(owner >= 0).tolist():
            out[i] = self._describe(int(owner[i]))
        return out

    def _merge(self) -> None:
        while len(self.runs) > 1 and len(self.runs[-1][0]) * 2 >= len(self.runs[-2][0]):
            (k1, h1, o1), (k2, h2, o2) = self.runs[-2], self.runs.pop()
            keys, high, ordinals = np.concatenate([k1, k2]), np.concatenate([h1, h2]), np.concatenate([o1, o2])
            sort = np.argsort(high, kind="stable")  # timsort: a linear merge of the two sorted runs
            merged = high[sort]
            if np.any(merged[1:] == merged[:-1]):  # digests sharing their first 8 bytes: order them by all 16
                sort = np.lexsort((_halves(keys)[1], high))
            self.runs[-1] = (keys[sort], high[sort], ordinals[sort])

    def _describe(self, ordinal: int) -> dict:
        chunk = bisect.bisect_right(self._info_starts, ordinal) - 1
        m, rows, lines, splits = self._info[chunk]
        k = ordinal - self._info_starts[chunk]
        return {"manifest": self.manifests[m], "row": int(rows[k]), "line": int(lines[k]),
                "split": (*SPLITS, "other")[int(splits[k])]}


def _take(values: Sequence, rows: Sequence[int]) -> list:
    """``[values[i] for i in rows]`` (at C speed)."""
    return list(map(values.__getitem__, rows))


@dataclass
class SplitRecords:
    """One split's share of a manifest batch, in row order: its records as columns and its
    Rejections, each with the row of the batch it comes from (so a cap can cut both at one row).
    """

    records: RecordColumns
    rows: list[int]
    rejections: list[Rejection] = field(default_factory=list)
    rejection_rows: list[int] = field(default_factory=list)

    def head(self, count: int) -> "SplitRecords":
        """The first ``count`` records (1 to ``len(rows)``) and the rejections of the rows before
        the last of them (what a cap reached at that record keeps)."""
        last = self.rows[count - 1]
        kept = bisect.bisect_left(self.rejection_rows, last)
        r = self.records
        records = RecordColumns(r.utterance_id[:count], r.transcript[:count], r.audio_path[:count],
                                r.speaker_id[:count], r.duration_s[:count], r.chars[:count],
                                None if r.audio_bytes is None else r.audio_bytes[:count],
                                None if r.offset_s is None else r.offset_s[:count])
        return SplitRecords(records, self.rows[:count], self.rejections[:kept], self.rejection_rows[:kept])


class BatchRecordBuilder:
    """:func:`asr_assets.records.build_records` for batches, every split at once.

    Args:
        config: filters and split fractions.
        allowed_audio_roots: as ``build_records``.
        probe_many: called with the rows that need a probed duration (column absent, cell empty
            or <= 0; never a segment) and pass every check before it; returns per row seconds or
            the exception (the row is then rejected, stage ``probe``). None: such rows are "no
            duration".
    """

    def __init__(self, config: RecordConfig, *, allowed_audio_roots: Sequence[str] | None = None,
                 probe_many: Callable[[list[ManifestRow]], list] | None = None):
        self.config = config
        self.claims = DigestClaims()
        self.roots = [os.path.realpath(r) for r in allowed_audio_roots] if allowed_audio_roots is not None else None
        self.probe_many = probe_many
        self._split_of: dict[str, str] = {}

    def _split(self, key: str) -> str:
        split = self._split_of.get(key)
        if split is None:
            if len(self._split_of) > 500_000:
                self._split_of.clear()
            split = self._split_of[key] = assign_split(key, self.config)
        return split

    def build(self, batch: ManifestBatch, wanted: set[str], fixed_split: str | None = None) -> dict[str, SplitRecords]:
        """Claim every row's utterance id and turn the rows of the ``wanted`` splits into, per
        split and in row order, records (as columns) and Rejections (:class:`SplitRecords`)."""
        n = len(batch)
        rn, fr = batch.row_number, batch.file_row
        paths = batch.audio_path
        keys = [u or p or str(r) for u, p, r in zip(batch.utterance_id, paths, rn)]
        speakers = batch.speaker_id
        if fixed_split is not None:
            splits = [fixed_split] * n
        else:  # the remembered split of each key; assign_split for the others
            split_keys = [s or k for s, k in zip(speakers, keys)]
            splits = list(map(self._split_of.get, split_keys))
            for i in [i for i, split in enumerate(splits) if split is None]:
                splits[i] = self._split(split_keys[i])
        firsts = self.claims.claim(keys, batch.manifest_path, rn, fr, splits)
        if not wanted:
            return {}
        config, roots = self.config, self.roots
        blobs = batch.audio_bytes or [None] * n
        audio_errors = batch.audio_error or [None] * n
        transcripts = batch.transcript
        candidates = [i for i in range(n) if splits[i] in wanted and firsts[i] is None and transcripts[i]]
        normalized, counts = _normalize_and_count(_take(transcripts, candidates), lowercase=config.lowercase)
        count_row = np.full(n, -1, dtype=np.int64)  # row -> its index in normalized / counts
        count_row[candidates] = np.arange(len(candidates))
        has_text = np.zeros(n, dtype=bool)
        has_text[candidates] = counts["chars"] > 0
        has_text = has_text.tolist()
        manifest = batch.manifest_path
        t_err, d_err = batch.transcript_error, batch.duration_error
        durations = batch.duration_s
        offsets, o_err = batch.offset_s or [None] * n, batch.offset_error
        rejected: list[tuple[int, str, str, str, dict | None]] = []  # (row, split, stage, reason, duplicate_of)
        pending: list[int] = []  # rows past the per-row checks, then the filters
        seconds: list[float | None] = []  # their durations (None: to be probed)
        stat, limit, sizes = os.stat, config.max_audio_file_bytes, batch.audio_size
        require_bytes, require_readable = config.require_audio_bytes, config.require_readable_audio
        for i in range(n):
            split = splits[i]
            if split not in wanted:
                continue
            if firsts[i] is not None:
                rejected.append((i, split, "manifest", f"duplicate utterance_id {keys[i]!r}", firsts[i]))
                continue
            if not has_text[i]:
                rejected.append((i, split, "manifest", (t_err[i] if t_err else None) or "no transcript", None))
                continue
            path, blob, audio_error = paths[i], blobs[i], audio_errors[i]
            outside = roots is not None and path is not None and not _inside(path, roots)
            remote = path is not None and "://" in path and is_url(path)  # s3://, https://, ...: never stat-ed
            if outside or path is None or remote:
                local_size = None
            elif sizes is not None:  # stat-ed by the manifest reader
                local_size = sizes[i]
            else:  # records._local_file_size, inlined
                try:
                    st = stat(path)
                    local_size = st.st_size if S_ISREG(st.st_mode) else None
                except (OSError, ValueError):
                    local_size = None
            reason = None
            if audio_error and local_size is None:
                reason = audio_error
            elif path is None and not blob:
                reason = "no audio source (neither path nor embedded bytes)"
            elif outside:
                reason = f"audio path {path!r} is outside the allowed roots {roots}"
            elif require_bytes and not blob:
                reason = "no embedded audio bytes (require_audio_bytes)"
            elif require_readable and not (blob or (path is not None and (
                    local_size is not None or remote))):
                reason = f"audio file not found: {path}"
            elif limit is not None and local_size is not None and local_size > limit:
                reason = (f"audio file is {local_size / 2**20:.2f} MiB ({local_size:,} bytes), over the "
                          f"{limit / 2**20:.4g} MiB limit (max_blob_mb)")
            elif d_err and d_err[i]:
                reason = d_err[i]
            elif o_err and o_err[i]:
                reason = o_err[i]
            if reason is not None:
                rejected.append((i, split, "manifest", reason, None))
                continue
            duration, offset = durations[i], offsets[i]
            if offset is not None:  # a segment: records.build_records' checks, same reasons
                if not math.isfinite(offset) or offset < 0:
                    rejected.append((i, split, "manifest", (
                        f"segment offset {offset!r} s is {'negative' if offset < 0 else 'not finite'}: "
                        "an offset counts seconds from the start of the audio file (>= 0)"), None))
                    continue
                if duration is None or not duration > 0:
                    rejected.append((i, split, "manifest", (
                        f"segment at offset {offset:.6g} s has no positive duration "
                        f"({'none given' if duration is None else repr(duration)}): a segment needs its "
                        "own duration (the file's header would give the whole file's)"), None))
                    continue
            if duration is None or duration <= 0:
                if self.probe_many is None:
                    rejected.append((i, split, "manifest", "no duration", None))
                    continue
                duration = None
            pending.append(i)
            seconds.append(duration)
        probes = [k for k, d in enumerate(seconds) if d is None]
        if probes:
            results = self.probe_many([batch.row(pending[k]) for k in probes])
            for k, result in zip(probes, results):
                if isinstance(result, BaseException):
                    i = pending[k]
                    rejected.append((i, splits[i], "probe", f"cannot read duration from audio header: {result}", None))
                    pending[k] = -1
                else:
                    seconds[k] = float(result)
            seconds = [d for d, i in zip(seconds, pending) if i >= 0]
            pending = [i for i in pending if i >= 0]
        rows = count_row[pending]
        passed = _passes(np.array(seconds, dtype=np.float64), {name: values[rows] for name, values in counts.items()},
                         config).tolist()
        chars = counts["chars"]
        accepted: dict[str, list[int]] = {s: [] for s in wanted}
        kept_seconds: dict[str, list[float]] = {s: [] for s in wanted}
        for i, duration, ok in zip(pending, seconds, passed):
            if ok:
                accepted[splits[i]].append(i)
                kept_seconds[splits[i]].append(duration)
                continue
            if not math.isfinite(duration):
                rejected.append((i, splits[i], "filter", f"duration {duration!r} is not finite", None))
                continue
            k = int(count_row[i])
            reason = filter_reason(int(chars[k]), int(counts["symbols"][k]), int(counts["alnum"][k]),
                                   int(counts["nonspace"][k]), int(counts["words"][k]), duration, config)
            if reason is None:  # cannot happen: _passes is filter_reason's "None"
                raise AssertionError(f"filters disagree on row {rn[i]} of {manifest}")
            rejected.append((i, splits[i], "filter", reason, None))
        rejected.sort(key=lambda r: r[0])  # each row gives at most one: row order
        out: dict[str, SplitRecords] = {}
        for split in wanted:
            picked = accepted[split]
            at = count_row[picked]
            records = RecordColumns(
                utterance_id=_take(keys, picked), transcript=normalized.gather(at), audio_path=_take(paths, picked),
                speaker_id=_take(speakers, picked), duration_s=kept_seconds[split], chars=chars[at],
                audio_bytes=_take(batch.audio_bytes, picked) if batch.audio_bytes else None,
                offset_s=_take(batch.offset_s, picked) if batch.offset_s else None)
            mine = [r for r in rejected if r[1] == split]
            out[split] = SplitRecords(records, picked,
                                      [self._reject(batch, keys, i, split, stage, reason, first)
                                       for i, _, stage, reason, first in mine], [r[0] for r in mine])
        return out

    @staticmethod
    def _reject(batch: ManifestBatch, keys: list[str], i: int, split: str, stage: str, reason: str,
                duplicate_of: dict | None = None) -> Rejection:
        path = batch.audio_path[i]
        embedded = (batch.audio_bytes and batch.audio_bytes[i]) or (batch.audio_error and batch.audio_error[i])
        audio_source = path if path is not None else ("<embedded bytes>" if embedded else None)
        return Rejection(keys[i], split, batch.source, batch.manifest_path, batch.row_number[i], audio_source, stage,
                         reason, batch.file_row[i], duplicate_of)


def _passes(duration: np.ndarray, counts: dict[str, np.ndarray], config: RecordConfig) -> np.ndarray:
    """Per row: finite and :func:`filter_reason` is None (the same float operations, vectorized)."""
    n, chars, words = counts["chars"], counts["nonspace"], counts["words"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(duration)
        ok &= (duration >= config.min_audio_duration_s) & (duration <= config.max_audio_duration_s)
        ok &= (n >= config.min_transcript_chars) & (n <= config.max_transcript_chars)
        ratio = np.where(n > 0, counts["symbols"] / np.maximum(n, 1), 0.0)
        ok &= ~(ratio > config.max_symbol_ratio)
        ok &= counts["alnum"] > 0
        cps, wps = chars / duration, words / duration
        ok &= (config.min_chars_per_second <= cps) & (cps <= config.max_chars_per_second)
        ok &= (config.min_words_per_second <= wps) & (wps <= config.max_words_per_second)
        per_char, per_word = duration / chars, duration / words
        ok &= (config.min_duration_per_char <= per_char) & (per_char <= config.max_duration_per_char)
        ok &= (config.min_duration_per_word <= per_word) & (per_word <= config.max_duration_per_word)
    return ok


__all__ = ["BatchRecordBuilder", "DigestClaims", "SplitRecords", "filter_reason", "normalize_and_count", "normalize_transcripts",
           "transcript_counts"]
