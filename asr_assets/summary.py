"""Per-split summary of the caches: what a user looks at after a run (no Dagster needed).

Entry points:
    - :func:`summarize_split` -> :class:`SplitSummary` (with one :class:`FeatureSummary` per frontend).
    - :func:`summary_markdown` — the summary as Markdown, plots inline as PNG data URIs;
      :func:`summaries_markdown` — that for several splits, rendered by several processes.
    - :func:`duration_histogram_png`, :func:`frames_histogram_png`, :func:`feature_stats_png` —
      the plots alone (PNG bytes; matplotlib, Agg canvas, no pyplot state).
    - :func:`png_markdown` — ``![alt](data:image/png;base64,...)``.

What is read, so that a summary stays cheap on a terabyte cache:

* the record store: its sidecars (durations, estimated frames) and one pass over the JSONL
  (speakers, utterance ids -> cache keys); the records report (rows not cached, by stage);
* per feature shard: the part footers (the index: which keys are live), the failure report, and
  the shard stats sidecar written by :func:`asr_assets.pipeline.build_feature_shards`
  (:func:`asr_assets.pipeline.shard_stats_path`). **No feature payload is read.**

Per-bin mean and std come from the sidecars' ``moments``: each feature run adds, per shard, the
per-bin sum, sum of squares and frame count of what it computed (accumulated where payloads are
written, :meth:`asr_assets.extraction.ShardStats.add_moments`), tagged with the parts it wrote.
The summary adds up the entries whose parts all still exist and whose rows are all still live
(index lookups only), so mean = sum / frames and std = sqrt(sumsq / frames - mean^2) are exact
over the utterances they cover, and ``moments_utterances`` says how many that is. Features not
written by a feature run (``lazy_cached`` write-back, a compacted part, upstream's writer) or
superseded since (tombstoned) are not covered; the Markdown says so.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import storage
from .feature_cache import (PREFETCH_THREADS, ShardedParquetFeatureCache, cache_key, list_shard_files, map_shards,
                            shard_dir, shard_index)
from .frontends import Frontend
from .pipeline import listed_failure_reports, read_shard_stats
from .record_cache import RecordStore, record_cache_exists
from .settings import Settings

logger = logging.getLogger(__name__)

#: Record-cache sample rate: ``num_samples`` sidecar entries are at 16 kHz (spec §1).
RECORD_SAMPLE_RATE_HZ = 16000


@dataclass
class FeatureSummary:
    """One frontend's features of one split.

    Attributes:
        with_features: records with a live key in their shard's index.
        failures_by_stage: utterances in the shards' failure reports, by stage (``decode``,
            ``featurize``, ``timeout``, ``worker``).
        computed / already_cached / failed: in the latest feature run of each shard.
        audio_seconds: audio featurized by those runs; ``worker_seconds`` the worker time it took.
        wall_seconds / run_audio_seconds: wall time and audio of those runs as a whole (each
            distinct run once), for :attr:`xrt_wall`.
        moments_utterances / moments_frames: what ``mean`` / ``std`` (float64 ``[feature_dim]``,
            None without data) cover.
    """

    frontend: str
    frontend_hash: str
    feature_dim: int
    records: int = 0
    with_features: int = 0
    failures_by_stage: dict[str, int] = field(default_factory=dict)
    computed: int = 0
    already_cached: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    worker_seconds: float = 0.0
    wall_seconds: float = 0.0
    run_audio_seconds: float = 0.0
    runs: int = 0
    last_run_at: float | None = None
    moments_utterances: int = 0
    moments_frames: int = 0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def xrt_per_core(self) -> float:
        """Seconds of audio featurized per second of worker time (decode + features)."""
        return self.audio_seconds / self.worker_seconds if self.worker_seconds > 0 else 0.0

    @property
    def xrt_wall(self) -> float:
        """Seconds of audio featurized per wall-clock second of the runs (all workers)."""
        return self.run_audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def failures(self) -> int:
        return sum(self.failures_by_stage.values())


@dataclass
class SplitSummary:
    """The record cache and feature caches of one split.

    Attributes:
        durations_s: float64 ``[utterances]`` seconds (from the ``num_samples`` sidecar).
        estimated_frames: int64 ``[utterances]`` 10 ms frames (``estimated_frames`` sidecar).
        rows_not_cached_by_stage: entries of ``reports/records-<split>.jsonl`` by stage.
    """

    split: str
    utterances: int = 0
    audio_seconds: float = 0.0
    speakers: int = 0
    utterances_with_speaker: int = 0
    durations_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    estimated_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows_not_cached_by_stage: dict[str, int] = field(default_factory=dict)
    features: list[FeatureSummary] = field(default_factory=list)

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600


def _report_stages(path: Path, listed: bool = False) -> Counter:
    """Failures by stage in a JSONL report; ``listed``: a listing showed it exists (no HEAD)."""
    stages: Counter = Counter()
    if listed or path.is_file():  # a Path, or a UPath of an object (one HEAD, one GET)
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    stages[json.loads(line).get("stage") or "unknown"] += 1
    return stages


def summarize_split(settings: Settings, split: str, frontends: Sequence[Frontend | str] | None = None) -> SplitSummary:
    """Summarize ``split`` of ``settings.output`` for ``frontends`` (default: the settings').

    Reads no feature payload (see the module docstring). A split without a record cache gives
    an empty summary.
    """
    resolved = [settings.frontend(f) if isinstance(f, str) else f
                for f in (settings.frontends if frontends is None else frontends)]
    summary = SplitSummary(split, rows_not_cached_by_stage=dict(_report_stages(settings.records_report_path(split))))
    path = settings.record_cache_path(split)
    ids: list[str] = []
    if record_cache_exists(path):
        store = RecordStore(path)
        summary.utterances = len(store)
        samples = store.sidecars.get("num_samples")
        if samples is not None:
            summary.durations_s = samples.astype(np.float64) / RECORD_SAMPLE_RATE_HZ
            summary.audio_seconds = float(summary.durations_s.sum())
        frames = store.sidecars.get("estimated_frames")
        if frames is not None:
            summary.estimated_frames = frames.astype(np.int64)
        speakers = set()
        with open(store.path, "rb") as handle:  # on an object store: the committed local copy
            for line in handle:
                record = json.loads(line)
                ids.append(record["utterance_id"])
                if record.get("has_speaker_id") and record.get("speaker_id") not in (None, ""):
                    speakers.add(record["speaker_id"])
                    summary.utterances_with_speaker += 1
        summary.speakers = len(speakers)
    for frontend in resolved:
        summary.features.append(_summarize_features(settings, split, frontend, ids))
    return summary


def _summarize_features(settings: Settings, split: str, frontend: Frontend, ids: Iterable[str]) -> FeatureSummary:
    fhash = frontend.frontend_hash()
    result = FeatureSummary(frontend.name, fhash, frontend.feature_dim)
    split_root = settings.feature_split_root(split)
    wanted: dict[int, set[str]] = {}
    for utterance_id in ids:
        key = cache_key(utterance_id, fhash)
        wanted.setdefault(shard_index(key, settings.num_shards), set()).add(key)
        result.records += 1
    cache = ShardedParquetFeatureCache(split_root, settings.num_shards)
    stages: Counter = Counter()
    runs: dict[str, tuple[float, float]] = {}
    total = np.zeros(frontend.feature_dim)
    total_sq = np.zeros(frontend.feature_dim)
    reports = listed_failure_reports(settings, frontend.name, split)
    # on an object store one listing says which shard folders exist (not a request per shard),
    # and the shards' indexes and stats sidecars are read several at once
    remote = storage.is_url(split_root)
    listing = list_shard_files(split_root) if remote else None
    shards = [s for s in (sorted(listing) if remote else range(settings.num_shards))
              if s < settings.num_shards and (remote or shard_dir(split_root, s).is_dir())]
    cache.prefetch(shards, listing=listing)
    states = dict(zip(shards, map_shards(lambda shard: read_shard_stats(split_root, shard, fhash), shards,
                                         PREFETCH_THREADS if remote else 1)))
    for shard in range(settings.num_shards):
        report = settings.features_report_path(frontend.name, split, shard)
        if reports is None or report.name in reports:
            stages += _report_stages(report, listed=reports is not None)
        if shard not in states:
            continue
        live = cache.keys(shard, frontend_hash=fhash)
        result.with_features += len(live & wanted.get(shard, set()))
        state = states[shard]
        if state is None:
            continue
        last = state.get("last_run") or {}
        result.computed += int(last.get("computed", 0))
        result.already_cached += int(last.get("skipped", 0))
        result.failed += int(last.get("failed", 0))
        result.audio_seconds += float(last.get("shard_audio_seconds", 0.0))
        result.worker_seconds += float(last.get("worker_seconds", 0.0))
        if "run" in last:
            runs[last["run"]] = (float(last.get("wall_seconds", 0.0)), float(last.get("audio_seconds", 0.0)))
            finished = float(last.get("finished_at", 0.0))
            result.last_run_at = max(result.last_run_at or finished, finished)
        entries = cache.shard_entries(shard)
        present = {os.path.basename(str(where[0])) for where in entries.values() if where is not None}
        live_rows = Counter(os.path.basename(str(where[0])) for key, where in entries.items()
                            if where is not None and key in live)
        for entry in state.get("moments", []):
            parts = entry.get("parts") or []
            if len(entry.get("sum", ())) != frontend.feature_dim:
                continue
            # exact only while every row it counted is still live in its parts
            if not all(name in present for name in parts):
                continue
            if sum(live_rows.get(name, 0) for name in parts) != entry["utterances"]:
                continue
            result.moments_utterances += int(entry["utterances"])
            result.moments_frames += int(entry["frames"])
            total += np.asarray(entry["sum"], dtype=np.float64)
            total_sq += np.asarray(entry["sumsq"], dtype=np.float64)
    result.failures_by_stage = dict(sorted(stages.items()))
    result.runs = len(runs)
    result.wall_seconds = sum(w for w, _ in runs.values())
    result.run_audio_seconds = sum(a for _, a in runs.values())
    if result.moments_frames:
        result.mean = total / result.moments_frames
        result.std = np.sqrt(np.maximum(total_sq / result.moments_frames - result.mean ** 2, 0.0))
    return result


# --- plots ------------------------------------------------------------------------------------

_FIGSIZE_IN = (6.4, 2.6)
_DPI = 90
#: What the plots import (~0.5 s): a fork server that preloads them forks plot workers that have
#: them already (``asr-assets materialize`` asks for that, :func:`asr_assets.extraction.start_fork_server`).
PLOT_MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure():
    """A figure with fixed margins: 576 x 234 px. A constrained layout and a tight bounding box
    fitted the same plots at ~2x the rendering time (0.45 -> 0.29 s for a split's three plots)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=_FIGSIZE_IN)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.19, top=0.9)
    return fig, fig.subplots()


def _histogram_png(values: np.ndarray, xlabel: str, title: str) -> bytes:
    fig, ax = _figure()
    values = np.asarray(values, dtype=np.float64)
    if len(values):
        ax.hist(values, bins=min(50, max(10, int(math.sqrt(len(values))))), color="#4f6cb0", edgecolor="white")
        median = float(np.median(values))
        ax.axvline(median, color="#c0392b", linewidth=1, label=f"median {median:.4g}")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no utterances", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("utterances")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def duration_histogram_png(durations_s: np.ndarray, split: str = "") -> bytes:
    """PNG histogram of utterance durations (seconds), with the median marked."""
    return _histogram_png(durations_s, "duration (s)", f"{split} utterance durations".strip())


def frames_histogram_png(frames: np.ndarray, split: str = "") -> bytes:
    """PNG histogram of frames per utterance (10 ms frames from the record cache's sidecar)."""
    return _histogram_png(frames, "frames per utterance (10 ms)", f"{split} frames per utterance".strip())


def feature_stats_png(mean: np.ndarray, std: np.ndarray, title: str = "") -> bytes:
    """PNG of per-bin mean (line) and mean ± std (band) over the feature bins."""
    fig, ax = _figure()
    bins = np.arange(len(mean))
    ax.fill_between(bins, mean - std, mean + std, color="#4f6cb0", alpha=0.25, linewidth=0, label="mean ± std")
    ax.plot(bins, mean, color="#4f6cb0", linewidth=1.5, label="mean")
    ax.plot(bins, std, color="#c0392b", linewidth=1, linestyle="--", label="std")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("feature bin (mel bin)")
    ax.set_ylabel("value")
    ax.set_xlim(0, max(len(mean) - 1, 1))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8, frameon=False, ncols=3)
    return _png(fig)


def _standardized(mean: np.ndarray, std: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Per-bin mean 0 and std 1 within ``tolerance``: features standardized per utterance."""
    return bool(len(mean)) and float(np.max(np.abs(mean))) < tolerance and float(np.max(np.abs(std - 1))) < tolerance


def png_markdown(png: bytes, alt: str) -> str:
    """``![alt](data:image/png;base64,...)`` (Dagster's UI renders data URIs in Markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# --- Markdown ---------------------------------------------------------------------------------


def _table(rows: Iterable[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summaries_markdown(summaries: Sequence[SplitSummary], workers: int = 1) -> list[str]:
    """:func:`summary_markdown` (with plots) of each summary, in order. With ``workers`` > 1 and
    more than one summary, up to ``workers`` processes of the ``forkserver`` context render one
    summary each at once (a split's three plots take ~0.25 s to draw, and matplotlib's import
    another ~0.5 s unless the fork server preloads :data:`PLOT_MODULES`); else this process
    renders them one after the other. Same bytes either way; a pool that cannot start or loses a
    process (the OOM killer, say) leaves the rendering to this process, with a warning."""
    if workers > 1 and len(summaries) > 1:
        import concurrent.futures
        import multiprocessing
        from concurrent.futures.process import BrokenProcessPool

        try:
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(summaries)),
                                                        mp_context=multiprocessing.get_context("forkserver")) as pool:
                return list(pool.map(summary_markdown, summaries))
        except (BrokenProcessPool, OSError) as exc:
            logger.warning("summary plots: worker processes failed (%s: %s); drawing them in this process",
                           type(exc).__name__, exc)
    return [summary_markdown(s) for s in summaries]


def summary_markdown(summary: SplitSummary, *, plots: bool = True) -> str:
    """The summary as Markdown: key numbers, failures by stage, per frontend what its latest runs
    did, and (``plots``) the duration and frames histograms and per-bin mean/std inline."""
    s = summary
    speakers = f"{s.speakers} ({s.utterances_with_speaker} utterances with a speaker id)"
    out = [f"### {s.split}: {s.utterances} utterances, {s.audio_hours:.3f} h, {s.speakers} speakers", "",
           _table([("utterances", s.utterances), ("audio hours", f"{s.audio_hours:.4f}"), ("speakers", speakers),
                   ("manifest rows not cached", sum(s.rows_not_cached_by_stage.values()))], ("", "")), ""]
    if s.rows_not_cached_by_stage:
        out += ["**Manifest rows not cached, by stage** (`reports/records-<split>.jsonl`)", "",
                _table(sorted(s.rows_not_cached_by_stage.items()), ("stage", "rows")), ""]
    for f in s.features:
        out += [f"#### `{f.frontend}` features (`{f.frontend_hash}`, {f.feature_dim} bins)", "",
                _table([("with features", f"{f.with_features} of {f.records}"),
                        ("failed (reported)", f.failures),
                        ("latest run of each shard: computed / already cached / failed",
                         f"{f.computed} / {f.already_cached} / {f.failed}"),
                        ("× real time per core", f"{f.xrt_per_core:.1f}"),
                        ("× real time, wall (all workers)", f"{f.xrt_wall:.1f} over {f.runs} runs"),
                        ("per-bin stats cover", f"{f.moments_utterances} utterances, {f.moments_frames} frames")],
                       ("", "")), ""]
        if f.failures_by_stage:
            out += [_table(sorted(f.failures_by_stage.items()), ("failure stage", "utterances")), ""]
        if f.moments_utterances < f.with_features:
            out += [f"Per-bin stats leave out {f.with_features - f.moments_utterances} utterances whose features "
                    "were not written by a feature run since (compacted, written back by `lazy_cached`, "
                    "or tombstoned).", ""]
    if plots:
        out += [png_markdown(duration_histogram_png(s.durations_s, s.split), f"{s.split} durations"), "",
                png_markdown(frames_histogram_png(s.estimated_frames, s.split), f"{s.split} frames per utterance"), ""]
        for f in s.features:
            if f.mean is not None:
                out += [png_markdown(feature_stats_png(f.mean, f.std, f"{s.split} {f.frontend}: per-bin mean ± std "
                                                       f"({f.moments_frames} frames)"),
                                     f"{f.frontend} per-bin mean and std"), ""]
                if _standardized(f.mean, f.std):
                    out += [f"`{f.frontend}` standardizes every bin over each utterance's frames, so the mean is 0 "
                            "and the std 1 in every bin by construction: this plot cannot show a level or gain "
                            "problem in its input.", ""]
    return "\n".join(out).rstrip() + "\n"
