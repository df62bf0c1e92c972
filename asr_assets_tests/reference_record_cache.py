"""The per-row record-cache build of main before the streaming build (one split per pass over
every manifest): :func:`asr_assets.manifests.iter_manifest_rows` -> :func:`asr_assets.records.build_records`
-> :func:`asr_assets.record_cache.write_record_cache`, then the report. Those three stay in the
library, so this is the per-row build as it is now, segments included (``offset``/``start``
column, its row errors, ``offset_seconds``/``duration_seconds`` keys, sidecars and filters of the
segment).

Kept as the reference the streaming build (:func:`asr_assets.pipeline.build_record_caches`) is
tested against (``test_record_stream.py``: same JSONL, sidecars and report bytes) and measured
against (``benchmarks/scale.py``). It writes no ``<split>.inputs.json`` (no up-to-date skip).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace
from typing import Iterable

from asr_assets.manifests import ManifestRow, iter_manifest_rows
from asr_assets.pipeline import DurationProbe, record_config, write_jsonl_report
from asr_assets.record_cache import WriteSummary, write_record_cache
from asr_assets.records import Record, Rejection, build_records
from asr_assets.settings import Settings


def build_record_cache_reference(settings: Settings, split: str) -> tuple[WriteSummary, list[Rejection]]:
    """Write ``record_cache/<split>.jsonl`` (+ sidecars, blobs) and ``reports/records-<split>.jsonl``
    of ``settings`` the per-row way; returns the summary and the rejections."""
    config, caps = record_config(settings)
    sources, fixed_split = settings.manifests, None
    earlier: Iterable[ManifestRow] = ()
    if settings.validation_manifests:
        config = replace(config, val_fraction=0.0, test_fraction=0.0)
        if split == "validation":
            sources, fixed_split = settings.validation_manifests, "validation"
            earlier = iter_manifest_rows(settings.manifests, source_base=settings.source_base,
                                         on_error=lambda *_: None, read_audio_bytes=False)
    rejections: list[Rejection] = []

    def manifest_failed(manifest: str, rows_read: int, error: Exception) -> None:
        rejections.append(Rejection(None, split, manifest, manifest, rows_read + 1, None,
                                    getattr(error, "stage", "manifest"), str(error), line=getattr(error, "line", None)))

    probe = DurationProbe(settings.record_cache_path(split).parent / "probed_durations.parquet")

    def accepted() -> Iterable[Record]:
        rows = iter_manifest_rows(sources, source_base=settings.source_base, on_error=manifest_failed,
                                  max_blob_bytes=settings.max_blob_bytes)
        for item in build_records(rows, config, probe_duration=probe, splits=[split], fixed_split=fixed_split,
                                  allowed_audio_roots=settings.audio_roots(), earlier_rows=earlier):
            if isinstance(item, Rejection):
                rejections.append(item)
            else:
                yield item

    records: Iterable[Record] = accepted()
    cap = caps.get(split)
    with contextlib.closing(records):  # type: ignore[arg-type]
        if cap is not None:
            records = itertools.islice(records, max(cap, 0))
        summary = write_record_cache(settings.record_cache_path(split), records)
    probe.save()
    write_jsonl_report(settings.records_report_path(split), (r.to_report() for r in rejections))
    return summary, rejections
