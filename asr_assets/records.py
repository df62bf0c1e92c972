"""Records: transcript normalization, filters and seeded split assignment (spec §1.4, §1.6, §1.7).

Entry points:
    - :class:`RecordConfig` — filter bounds, split fractions and seed (upstream defaults).
    - :func:`normalize_transcript`, :func:`split_score`, :func:`assign_split`.
    - :func:`build_records` — manifest rows -> :class:`Record` or :class:`Rejection`, streamed.

Nothing here decodes audio; the optional ``probe_duration`` callable (from :mod:`asr_assets.audio`)
supplies durations for manifests without a duration column (real Common Voice).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from .errors import ConfigError
from .manifests import ManifestRow
from .storage import is_url as _is_url  # http(s), s3, gs, ...: a remote location, never stat-ed

SPLITS = ("train", "validation", "test")
TARGET_SAMPLE_RATE = 16000

_APOSTROPHES = str.maketrans({"\u2019": "'", "`": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"'})
_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")


@dataclass(frozen=True)
class RecordConfig:
    """Record filters and split assignment; defaults are upstream's (spec §1.6, §6).

    Durations are seconds; transcript lengths are Unicode code points.
    ``require_readable_audio`` (default True, upstream default False) drops rows whose audio is
    neither embedded bytes, an http(s) URL nor an existing local file, so a missing file is
    reported when the record cache is built instead of failing later at feature extraction.
    ``max_audio_file_bytes`` (default None: no limit; not upstream) drops rows whose local audio
    file is larger (one ``os.stat``); embedded bytes are limited when the manifest is read
    (:func:`asr_assets.manifests.iter_manifest_rows`, ``max_blob_bytes``).
    """

    seed: int = 13
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    lowercase: bool = False
    min_audio_duration_s: float = 0.01
    max_audio_duration_s: float = 30.0
    min_transcript_chars: int = 1
    max_transcript_chars: int = 400
    max_symbol_ratio: float = 0.5
    min_chars_per_second: float = 0.0
    max_chars_per_second: float = math.inf
    min_words_per_second: float = 0.0
    max_words_per_second: float = math.inf
    min_duration_per_char: float = 0.0
    max_duration_per_char: float = math.inf
    min_duration_per_word: float = 0.0
    max_duration_per_word: float = math.inf
    require_readable_audio: bool = True
    require_audio_bytes: bool = False
    max_audio_file_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"need 0 <= val, test and val+test < 1, got val={self.val_fraction!r} test={self.test_fraction!r}")
        if self.min_transcript_chars < 1:
            raise ConfigError(f"min_transcript_chars must be >= 1, got {self.min_transcript_chars!r}")
        if self.min_audio_duration_s <= 0:
            raise ConfigError(f"min_audio_duration_s must be > 0, got {self.min_audio_duration_s!r}")
        if self.max_audio_duration_s < self.min_audio_duration_s or self.max_transcript_chars < self.min_transcript_chars:
            raise ConfigError("each maximum must be >= its minimum")
        for bound in ("chars_per_second", "words_per_second", "duration_per_char", "duration_per_word"):
            low, high = getattr(self, f"min_{bound}"), getattr(self, f"max_{bound}")
            if high < low:
                raise ConfigError(f"max_{bound} must be >= min_{bound}, got {high!r} < {low!r}")


@dataclass(frozen=True)
class Record:
    """A usable utterance, as written to the record cache.

    ``num_samples`` is at 16 kHz: ``max(1, round_half_even(duration_s * 16000))``;
    ``estimated_frames = max(num_samples, 400) // 160 + 1`` whatever the frontend (spec §1.4).

    ``offset_s`` is None for a whole audio file. For a *segment* (a manifest row with an
    ``offset``/``start`` cell) it is the segment's start in seconds into ``audio_path`` (or the
    embedded bytes) and ``duration_s`` is the segment's length, so ``num_samples``, the
    filters and the duration caps all describe the segment, never the file.
    """

    utterance_id: str
    split: str
    transcript: str
    audio_path: str | None
    audio_bytes: bytes | None
    speaker_id: str | None
    duration_s: float
    source: str
    offset_s: float | None = None

    @property
    def num_samples(self) -> int:
        return max(1, round(self.duration_s * TARGET_SAMPLE_RATE))

    @property
    def estimated_frames(self) -> int:
        return max(self.num_samples, 400) // 160 + 1


@dataclass(frozen=True)
class Rejection:
    """A manifest row (or, with ``utterance_id`` None, a whole manifest file or one skipped line)
    that does not become a record: which row, where, and why.

    ``line`` is where the row is in its manifest file (:attr:`ManifestRow.file_row`: the TSV
    line, the Parquet row index), None for a whole file. ``duplicate_of`` is set on a row
    rejected because an earlier row has its utterance id: ``{"manifest", "row", "line",
    "split"}`` of that earlier row, the one that keeps the id.
    """

    utterance_id: str | None
    split: str
    source: str
    manifest_path: str
    row_number: int
    audio_source: str | None
    stage: str
    reason: str
    line: int | None = None
    duplicate_of: dict | None = None

    @classmethod
    def from_report(cls, report: dict) -> "Rejection":
        """Inverse of :meth:`to_report` (for a split found up to date)."""
        return cls(report["utterance_id"], report["split"], report["manifest"], report["manifest"], report["row"],
                   report["audio_source"], report["stage"], report["error"], report.get("line"),
                   report.get("duplicate_of"))

    def to_report(self) -> dict:
        report = {
            "utterance_id": self.utterance_id, "audio_source": self.audio_source, "stage": self.stage,
            "error": self.reason, "split": self.split, "manifest": self.manifest_path, "row": self.row_number,
            "line": self.line,
        }
        if self.duplicate_of is not None:
            report["duplicate_of"] = self.duplicate_of
        return report


def record_key(row: ManifestRow) -> str:
    """The utterance id a row's record gets (spec §1.7): the ``id`` cell, else the resolved audio
    path, else the row counter."""
    return row.utterance_id or row.audio_path or str(row.row_number)


class _FirstRows:
    """Which row first carried each utterance id, in discovery order (a few dozen bytes per id:
    the manifest path is interned, the rest packed into one int)."""

    _SHIFT = 1 << 40

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.manifests: list[str] = []
        self._manifest_index: dict[str, int] = {}

    def claim(self, utterance_id: str, row: ManifestRow, split: str) -> dict | None:
        """Record ``row`` as the first with ``utterance_id``, or return the first one's
        ``{"manifest", "row", "line", "split"}`` if an earlier row has it."""
        packed = self.first.get(utterance_id)
        if packed is not None:
            packed, split_index = divmod(packed, len(SPLITS) + 1)
            rest, line = divmod(packed, self._SHIFT)
            manifest, row_number = divmod(rest, self._SHIFT)
            return {"manifest": self.manifests[manifest], "row": row_number, "line": line,
                    "split": (*SPLITS, "other")[split_index]}
        manifest = self._manifest_index.get(row.manifest_path)
        if manifest is None:
            manifest = self._manifest_index[row.manifest_path] = len(self.manifests)
            self.manifests.append(row.manifest_path)
        split_index = SPLITS.index(split) if split in SPLITS else len(SPLITS)
        self.first[utterance_id] = ((manifest * self._SHIFT + row.row_number) * self._SHIFT + row.file_row) \
            * (len(SPLITS) + 1) + split_index
        return None


def normalize_transcript(text: str, *, lowercase: bool = False) -> str:
    """Upstream normalization, in order: strip, optional lowercase, ’`ʼ -> ', “”«» -> ",
    collapse whitespace, drop whitespace before ``, . ; : ! ?``."""
    text = text.strip()
    if lowercase:
        text = text.lower()
    text = text.translate(_APOSTROPHES)
    text = _WHITESPACE.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def split_score(key: str, seed: int = 13) -> float:
    """``int(sha256(f"{seed}:{key}")[:16], 16) / 16**16`` in [0, 1) (spec §1.7)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()[:16], 16) / 16**16


def assign_split(key: str, config: RecordConfig = RecordConfig()) -> str:
    """``train`` below ``1 - val - test``, then ``validation``, then ``test``."""
    score = split_score(key, config.seed)
    train_cutoff = 1.0 - config.val_fraction - config.test_fraction
    if score < train_cutoff:
        return "train"
    if score < train_cutoff + config.val_fraction:
        return "validation"
    return "test"


def symbol_ratio(text: str) -> float:
    """Share of code points that are not alphanumeric, whitespace, ``'`` or ``-``."""
    if not text:
        return 0.0
    symbols = sum(1 for ch in text if not (ch.isalnum() or ch.isspace() or ch in "'-"))
    return symbols / len(text)


def _local_file_size(path: str | None) -> int | None:
    """Size of the regular local file at ``path``, or None (no path, a URL, missing, not a file)."""
    if path is None or _is_url(path):
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def missing_audio_reason(path: str | None) -> str:
    """The rejection reason of a row whose audio file does not exist. When the file sits in a
    ``clips/`` folder beside where the path points (Common Voice's own layout: ``path`` cells are
    bare file names, the audio is in ``clips/``), the reason says so and names the fix. When the
    path exists in the other Unicode normalization (NFC vs NFD: manifests written on one system,
    audio copied from macOS), the reason names the form on disk; paths are never normalized, as
    upstream."""
    reason = f"audio file not found: {path}"
    if path and "://" not in path:
        folder, name = os.path.split(path)
        clips = os.path.join(folder, "clips")
        if os.path.isfile(os.path.join(clips, name)):
            reason += (f" (a file of that name is in {clips}/, Common Voice's layout: pass --source-base {clips} "
                       f"(Settings.source_base))")
        for form in ("NFC", "NFD"):
            other = unicodedata.normalize(form, path)
            if other != path and os.path.isfile(other):
                reason += (f" (the path exists in Unicode {form} form: {other!r}; the manifest's is "
                           f"{path!r}: write the manifest's paths in the form the file system has)")
                break
    return reason


def _audio_readable(row: ManifestRow, local_size: int | None) -> bool:
    if row.audio_bytes:
        return True
    path = row.audio_path
    return path is not None and (_is_url(path) or local_size is not None)


def _inside(path: str, roots: Sequence[str]) -> bool:
    if _is_url(path):
        return False
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def _filter(transcript: str, duration: float, config: RecordConfig) -> str | None:
    if duration < config.min_audio_duration_s:
        return f"duration {duration:.6g} s < min {config.min_audio_duration_s} s"
    if duration > config.max_audio_duration_s:
        return f"duration {duration:.6g} s > max {config.max_audio_duration_s} s"
    n = len(transcript)
    if n < config.min_transcript_chars or n > config.max_transcript_chars:
        return f"transcript length {n} outside [{config.min_transcript_chars}, {config.max_transcript_chars}]"
    ratio = symbol_ratio(transcript)
    if ratio > config.max_symbol_ratio:
        return f"symbol ratio {ratio:.2f} > {config.max_symbol_ratio}"
    if not any(ch.isalnum() for ch in transcript):
        return "transcript has no alphanumeric character"
    chars = sum(1 for ch in transcript if not ch.isspace())
    words = len(transcript.split())
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


def build_records(
    rows: Iterable[ManifestRow],
    config: RecordConfig = RecordConfig(),
    *,
    probe_duration: Callable[[ManifestRow], float] | None = None,
    splits: Iterable[str] = SPLITS,
    fixed_split: str | None = None,
    allowed_audio_roots: Sequence[str] | None = None,
    earlier_rows: Iterable[ManifestRow] = (),
) -> Iterator[Record | Rejection]:
    """Turn manifest rows into records of the requested splits, streamed in manifest order.

    Every row whose split is requested yields exactly one :class:`Record` or :class:`Rejection`
    (rows of other splits yield nothing), so a caller can report every row that is not cached.
    The split is decided from ``speaker_id or utterance_id`` before filtering, so a rejected row
    is reported by exactly one split.

    **One utterance id, one record.** The first row with an utterance id, in discovery order
    over *all* rows (every split; ``earlier_rows`` first), owns the id; every later row with it
    is rejected as a duplicate (stage ``manifest``, ``duplicate_of`` naming the first row's
    manifest, row, line and split), whatever its split and even when the first row is itself
    rejected by a filter. So each split build, run on its own, agrees with the others on who
    owns an id, and features (keyed by utterance id) never get two transcripts.

    Args:
        rows: from :func:`asr_assets.manifests.iter_manifest_rows`.
        config: filters and split fractions.
        probe_duration: called for rows with no usable duration (column absent, cell empty, or
            a value <= 0); returns
            seconds or raises (the row is then rejected with the error). None: such rows are
            rejected as "no duration", as upstream does.
        splits: the splits to produce.
        fixed_split: put every row in this split instead of hashing (upstream's external
            validation sources, ``--validation-dataset-source``).
        allowed_audio_roots: if given, an audio path must resolve (symlinks followed, ``..``
            collapsed) inside one of these folders, and URLs are refused; other rows are rejected
            as "outside allowed roots" (hostile or mistaken manifests cannot make the pipeline read
            ``/etc/passwd`` or a network share).
        earlier_rows: rows that come before ``rows`` in discovery order and only claim their
            utterance ids (split by hash with ``config``, never ``fixed_split``); nothing is
            yielded for them. With external validation sources, the train manifests' rows.

    Filters run in upstream order after the duplicate check: transcript, audio source (a row
    whose embedded audio is unusable — ``audio_error`` — needs a readable local file), duration
    (a segment row — with ``offset_s`` — needs an offset >= 0 and its own duration > 0; it is
    never probed), duration bounds (of the segment, for a segment), transcript length, symbol ratio, alphanumeric, alignment bounds; local audio
    files over ``config.max_audio_file_bytes`` are rejected with the audio source checks.
    """
    wanted = set(splits)
    first_rows = _FirstRows()
    for row in earlier_rows:
        key = record_key(row)
        first_rows.claim(key, row, assign_split(row.speaker_id or key, config))
    roots = [os.path.realpath(r) for r in allowed_audio_roots] if allowed_audio_roots is not None else None
    for row in rows:
        utterance_id = record_key(row)
        split = fixed_split or assign_split(row.speaker_id or utterance_id, config)
        first = first_rows.claim(utterance_id, row, split)
        if split not in wanted:
            continue
        embedded = row.audio_bytes or row.audio_error
        audio_source = row.audio_path if row.audio_path is not None else ("<embedded bytes>" if embedded else None)

        reject = functools.partial(Rejection, utterance_id, split, row.source, row.manifest_path, row.row_number,
                                   audio_source, line=row.file_row)
        if first is not None:
            yield reject("manifest", f"duplicate utterance_id {utterance_id!r}", duplicate_of=first)
            continue

        transcript = normalize_transcript(row.transcript, lowercase=config.lowercase) if row.transcript else ""
        if not transcript:
            yield reject("manifest", row.transcript_error or "no transcript")
            continue
        # Confinement first: a path outside the allowed roots is never even stat'ed (a hostile
        # manifest could name a dead network mount).
        outside = roots is not None and row.audio_path is not None and not _inside(row.audio_path, roots)
        local_size = None if outside else _local_file_size(row.audio_path)
        if row.audio_error and local_size is None:
            # The embedded audio is unusable (over the blob limit, wrongly typed); a readable local
            # file at audio.path would have been used instead of the bytes anyway (spec §1.5).
            yield reject("manifest", row.audio_error)
            continue
        if row.audio_path is None and not row.audio_bytes:
            yield reject("manifest", "no audio source (neither path nor embedded bytes)")
            continue
        if outside:
            yield reject("manifest", f"audio path {row.audio_path!r} is outside the allowed roots {roots}")
            continue
        if config.require_audio_bytes and not row.audio_bytes:
            yield reject("manifest", "no embedded audio bytes (require_audio_bytes)")
            continue
        if config.require_readable_audio and not _audio_readable(row, local_size):
            yield reject("manifest", missing_audio_reason(row.audio_path))
            continue
        limit = config.max_audio_file_bytes
        if limit is not None and local_size is not None and local_size > limit:
            yield reject("manifest", f"audio file is {local_size / 2**20:.2f} MiB ({local_size:,} bytes), over the "
                                     f"{limit / 2**20:.4g} MiB limit (max_blob_mb)")
            continue
        duration = row.duration_s
        if row.duration_error:
            yield reject("manifest", row.duration_error)
            continue
        offset = row.offset_s
        if row.offset_error:
            yield reject("manifest", row.offset_error)
            continue
        if offset is not None:  # a segment: [offset, offset + duration) seconds of the file
            if not math.isfinite(offset) or offset < 0:
                yield reject("manifest", f"segment offset {offset!r} s is {'negative' if offset < 0 else 'not finite'}: "
                                         "an offset counts seconds from the start of the audio file (>= 0)")
                continue
            if duration is None or not duration > 0:
                yield reject("manifest", f"segment at offset {offset:.6g} s has no positive duration "
                                         f"({'none given' if duration is None else repr(duration)}): a segment needs its "
                                         "own duration (the file's header would give the whole file's)")
                continue
        if duration is None or duration <= 0:
            # A zero duration is what tools write when they could not read the file (seen in
            # real manifests, e.g. for Opus without OpusTags): ask the audio header instead.
            if probe_duration is None:
                yield reject("manifest", "no duration")
                continue
            try:
                duration = float(probe_duration(row))
            except Exception as exc:  # the probe's error is the report's reason
                yield reject("probe", f"cannot read duration from audio header: {exc}")
                continue
        if not math.isfinite(duration):
            yield reject("filter", f"duration {duration!r} is not finite")
            continue
        reason = _filter(transcript, duration, config)
        if reason is not None:
            yield reject("filter", reason)
            continue
        yield Record(utterance_id, split, transcript, row.audio_path, row.audio_bytes, row.speaker_id, duration, row.source,
                     offset)
