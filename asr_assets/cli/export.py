"""``asr-assets export``: the features of one split and frontend as another store backend, or
(``--backend lhotse``) as a lhotse CutSet manifest whose features point at the cache."""

from __future__ import annotations

import argparse
import re

from ..errors import ConfigError
from ..settings import SPLITS, Settings
from ._common import plural


def add_parser(sub) -> argparse.ArgumentParser:
    exp = sub.add_parser("export", help="write one frontend's features of a split into another store backend "
                                        "(numpy_memmap, hdf5), or a lhotse CutSet manifest reading them "
                                        "(lhotse), in record order, atomically")
    exp.add_argument("--output", metavar="DIR", help="output root holding feature-cache/ and record_cache/ "
                                                     "(default: $ASR_ASSETS_OUTPUT or artifacts/)")
    exp.add_argument("--split", required=True, choices=SPLITS, help="split to export")
    exp.add_argument("--frontend", metavar="NAME", default="squeezeformer",
                     help="frontend whose features to export, a name or a hash12 (default: squeezeformer)")
    exp.add_argument("--output-name", metavar="NAME", default=None,
                     help="for a frontend with named outputs: the (float) output to export")
    exp.add_argument("--backend", required=True, metavar="NAME",
                     help="storage backend: numpy_memmap or hdf5; or lhotse: a CutSet manifest whose features "
                          "point at the cache (read after `import asr_assets.bridges.lhotse`)")
    exp.add_argument("--to", required=True, metavar="PATH",
                     help="the new store's folder (must not exist, or be empty); for lhotse the manifest, "
                          "*.jsonl.gz (must not exist)")
    exp.add_argument("--store", metavar="DIR", help="lhotse only: point the cuts' features at this exported store "
                                                    "(numpy_memmap, hdf5) instead of the Parquet cache")
    return exp


def run(args: argparse.Namespace) -> int:
    """Reads ``<output>/feature-cache/<split>`` for the utterances of ``<output>/record_cache/<split>.jsonl``
    (in record order), skips records without features and prints one summary line.

    With ``--backend lhotse`` it writes a CutSet manifest instead
    (:func:`asr_assets.bridges.lhotse.export_cuts`), whose features point at the cache, or at
    ``--store``.

    Raises:
        AsrAssetsError: a missing cache, an unknown frontend or backend, a ``--to`` that is a
            file or a folder that is not empty (for lhotse: that exists, or is not ``*.jsonl.gz``).
    """
    settings = Settings.from_env(output=args.output)
    from ..stores import available_stores, export_feature_store

    frontend = args.frontend
    if not re.fullmatch(r"[0-9a-f]{12}", frontend):
        frontend = settings.frontend(frontend)  # UnknownFrontendError with "did you mean"
    if args.store is not None and args.backend != "lhotse":
        raise ConfigError(f"--store is for --backend lhotse only (got --backend {args.backend!r})")
    lhotse = args.backend == "lhotse"
    if not lhotse and args.backend not in available_stores(writable=True):
        raise ConfigError(f"unknown --backend {args.backend!r}; available: "
                          f"{', '.join(available_stores(writable=True) + ['lhotse'])}")
    split_root, records = settings.feature_split_root(args.split), settings.record_cache_path(args.split)
    if args.store is None and not (split_root / "feature_shards").is_dir():
        raise ConfigError(f"no feature cache at {str(split_root)!r}: run asr-assets materialize --output "
                          f"{str(settings.output_path)!r} first")
    if not records.is_file():
        raise ConfigError(f"no record cache at {str(records)!r}: run asr-assets materialize --output "
                          f"{str(settings.output_path)!r} first")
    from ..stores.sharded_parquet import frontends_in_parts

    cached = frontends_in_parts(split_root) if args.store is None else {}  # refuse a frontend that is not there
    wanted = frontend if isinstance(frontend, str) else frontend.frontend_hash()
    if cached and None not in cached and wanted not in cached:
        held = ", ".join(f"{m['frontend'] or '?'} ({h})" for h, m in sorted(cached.items()))
        raise ConfigError(f"the feature cache {str(split_root)!r} holds no features of {args.frontend!r} ({wanted}); "
                          f"it holds: {held}")
    if lhotse:
        if args.output_name:
            raise ConfigError("--output-name is not supported with --backend lhotse (its features are float32 frames)")
        return _run_lhotse(args, settings, frontend)
    summary = export_feature_store(split_root, args.to, backend=args.backend, frontend=frontend, record_cache=records,
                                   output=args.output_name)
    what = f"{summary.frontend} {summary.frontend_hash}" if summary.frontend else summary.frontend_hash
    print(f"{args.split} [{what}] -> {summary.path} "
          f"({summary.storage_type}): {plural(summary.written, 'utterance')} written, {summary.missing} without "
          f"features (skipped), {summary.nbytes / 1e6:.1f} MB, {summary.seconds:.2f} s")
    return 0


def _run_lhotse(args: argparse.Namespace, settings: Settings, frontend) -> int:
    """``--backend lhotse``: :func:`asr_assets.bridges.lhotse.export_cuts` and one summary line."""
    try:
        from ..bridges.lhotse import export_cuts
    except ImportError as exc:
        raise ConfigError(f"--backend lhotse needs lhotse: pip install \"asr_assets[lhotse]\" ({exc})") from exc
    if isinstance(frontend, str):
        raise ConfigError(f"--backend lhotse needs --frontend as a name, not the hash {frontend!r} "
                          "(the cuts' frame shift comes from the frontend)")
    summary = export_cuts(settings.feature_split_root(args.split), args.to, frontend=frontend,
                          record_cache=settings.record_cache_path(args.split), store=args.store)
    print(f"{args.split} [{summary.frontend} {summary.frontend_hash}] -> {summary.path} (lhotse CutSet, features "
          f"{summary.storage_type} at {summary.storage_path}): {plural(summary.written, 'cut')} written, "
          f"{summary.missing} without features (skipped), {summary.without_recording} without a recording, "
          f"{summary.seconds:.2f} s")
    return 0
