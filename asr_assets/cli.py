"""``asr-assets`` command line.

    asr-assets materialize [--manifests PATH]... [--output DIR] [--frontend NAME]... [--workers N]
                           [--plugin MODULE]... [--n-fft N --hop-length N ...] [--source-base DIR]
                           [--confine-audio [DIR]] [--no-ffmpeg-fallback] [--fail-fast]
    asr-assets frontends
    asr-assets compact [--output DIR] [--frontend NAME]... [--split SPLIT]...

``materialize`` runs the whole graph through Dagster against the instance in ``DAGSTER_HOME``
(default ``./dagster_home``): one run per split of ``record_cache``, then one run per split
covering all 64 shards of every enabled frontend. Runs, lineage and metadata then show in
``dagster dev``. Exit status: 0 when the graph is complete (utterances that failed are in
``<output>/reports/``), 1 when a run failed, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import AsrAssetsError
from .settings import SPLITS, Settings

_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_bool.__name__ = "bool"
_OVERRIDES = {
    "--sample-rate": int, "--n-fft": int, "--win-length": int, "--hop-length": int, "--n-mels": int,
    "--preemphasis": float, "--normalize-signal": _bool, "--normalize-feature": _bool, "--normalize-per-frame": _bool,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-assets", description="Record and feature caches for ASR training.")
    sub = parser.add_subparsers(dest="command", required=True)
    mat = sub.add_parser("materialize", help="materialize the whole graph (record cache, then feature shards)")
    mat.add_argument("--manifests", action="append", metavar="PATH",
                     help="manifest file or folder; repeatable (default: $ASR_ASSETS_MANIFESTS or the bundled sample)")
    mat.add_argument("--validation-manifests", action="append", metavar="PATH",
                     help="external validation source; repeatable (then every row of --manifests goes to train)")
    mat.add_argument("--output", metavar="DIR", help="output root (default: $ASR_ASSETS_OUTPUT or artifacts/)")
    mat.add_argument("--frontend", action="append", metavar="NAME",
                     help="frontend to cache; repeatable (default: $ASR_ASSETS_FRONTENDS or squeezeformer)")
    mat.add_argument("--plugin", action="append", metavar="MODULE",
                     help="import MODULE first (it registers frontends); repeatable (default: $ASR_ASSETS_PLUGINS)")
    over = mat.add_argument_group("frontend overrides (upstream CLI flags; they change the cache key)")
    for flag, kind in _OVERRIDES.items():
        over.add_argument(flag, type=kind, metavar=kind.__name__.upper())
    mat.add_argument("--workers", type=int, help="feature-extraction processes (default: every core)")
    mat.add_argument("--source-base", metavar="DIR", help="base folder of relative audio paths instead of each manifest root")
    mat.add_argument("--no-ffmpeg-fallback", action="store_true", help="decode with libsndfile only (no PyAV)")
    mat.add_argument("--confine-audio", action="append", nargs="?", const="", metavar="DIR",
                     help="refuse audio outside the manifest roots (or outside DIR; repeatable) and report it")
    mat.add_argument("--fail-fast", action="store_true", help="fail the run on the first utterance that cannot be featurized")
    sub.add_parser("frontends", help="list the registered frontends with their cache hash")
    comp = sub.add_parser("compact", help="merge each shard's parts into one (newest row per key, tombstones dropped)")
    comp.add_argument("--output", metavar="DIR", help="output root (default: $ASR_ASSETS_OUTPUT or artifacts/)")
    comp.add_argument("--frontend", action="append", metavar="NAME",
                      help="only this frontend; repeatable (default: every frontend found in the parts)")
    comp.add_argument("--split", action="append", choices=SPLITS, help="split; repeatable (default: all)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    from .manifests import discover_manifests

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _OVERRIDES}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings.from_env(
        manifests=args.manifests, validation_manifests=args.validation_manifests, output=args.output,
        frontends=args.frontend, plugins=args.plugin, workers=args.workers, source_base=args.source_base,
        ffmpeg_fallback=False if args.no_ffmpeg_fallback else None, fail_fast=True if args.fail_fast else None,
        confine_audio_paths=True if args.confine_audio else None,
        allowed_audio_roots=tuple(d for d in (args.confine_audio or []) if d) or None,
    )
    if overrides:
        settings = settings.with_(frontend_overrides={name: overrides for name in settings.frontends})
    for source in (*settings.manifests, *settings.validation_manifests):
        discover_manifests(source)  # raises ManifestError naming the source
    for name in settings.frontends:
        settings.frontend(name)  # raises UnknownFrontendError listing the available ones, or a bad override
    if settings.source_base and not Path(settings.source_base).is_dir():
        raise AsrAssetsError(f"--source-base {settings.source_base!r} is not a folder")
    return settings


def _dagster_instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME") or "dagster_home"
    home = str(Path(home).resolve())
    Path(home).mkdir(parents=True, exist_ok=True)
    config = Path(home) / "dagster.yaml"
    if not config.exists():  # a fresh instance: local SQLite storage, no telemetry
        config.write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    os.environ["DAGSTER_HOME"] = home
    return dg.DagsterInstance.get()


def materialize(settings: Settings) -> int:
    """Run the whole graph; returns the process exit status."""
    import warnings

    import dagster as dg

    from .definitions import build_graph
    from .defs.partitions import NUM_SHARDS, feature_partition_key

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    instance = _dagster_instance()
    graph = build_graph(settings)
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]
    print(f"asr-assets: manifests {list(settings.manifests)} -> {settings.output_path} "
          f"(frontends {', '.join(settings.frontends)}; DAGSTER_HOME={os.environ['DAGSTER_HOME']})", flush=True)

    def run(selection, start: str, end: str, what: str) -> bool:
        one = start == end  # a single partition: per-partition data version and check history
        tags = {"asr/cli": "materialize"}
        if not one:
            tags.update({"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end})
        result = dg.materialize(
            everything, selection=selection, instance=instance, resources=graph.resources, raise_on_error=False,
            run_config=_QUIET_LOGS, partition_key=start if one else None, tags=tags,
        )
        if not result.success:
            print(f"asr-assets: run {result.run_id} ({what}) FAILED; see `dagster dev` or the log above", file=sys.stderr)
        return result.success

    ok = all([run(dg.AssetSelection.assets(graph.record_cache), split, split, f"record_cache[{split}]") for split in SPLITS])
    if ok:
        for split in SPLITS:
            ok = run(dg.AssetSelection.assets(*graph.feature_assets), feature_partition_key(split, 0),
                     feature_partition_key(split, NUM_SHARDS - 1), f"features of {split}") and ok
    _print_summary(settings)
    return 0 if ok else 1


def _print_summary(settings: Settings) -> None:
    from .record_cache import RecordStore

    reports = settings.output_path / "reports"
    for split in SPLITS:
        path = settings.record_cache_path(split)
        if path.exists():
            rejected = settings.records_report_path(split)
            n_rejected = sum(1 for _ in open(rejected, encoding="utf-8")) if rejected.exists() else 0
            print(f"  {split:<10} {len(RecordStore(path)):>7} records, {n_rejected} manifest rows not cached")
    failures = sum(sum(1 for _ in open(p, encoding="utf-8")) for p in reports.glob("*/*/shard_*.jsonl")) if reports.exists() else 0
    print(f"  feature failures: {failures} (reports under {reports})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "frontends":
        from .frontends import available_frontends, get_frontend

        for name in available_frontends():
            fe = get_frontend(name)
            print(f"{name:<16} dim {fe.feature_dim:<5} hash {fe.frontend_hash()}")
        return 0
    if args.command == "compact":
        return compact(args)
    try:
        settings = _settings(args)
    except (AsrAssetsError, ValueError) as exc:
        print(f"asr-assets: error: {exc}", file=sys.stderr)
        return 2
    return materialize(settings)


def compact(args: argparse.Namespace) -> int:
    """``asr-assets compact``: one part per shard and frontend; safe while readers run."""
    from .feature_cache import compact_split

    try:
        settings = Settings.from_env(output=args.output)
        hashes = {settings.frontend(name).frontend_hash() for name in args.frontend} if args.frontend else None
    except (AsrAssetsError, ValueError) as exc:
        print(f"asr-assets: error: {exc}", file=sys.stderr)
        return 2
    for split in args.split or SPLITS:
        for frontend_hash, totals in compact_split(settings.feature_split_root(split), hashes).items():
            print(f"{split} [{frontend_hash}]: parts {totals['parts_before']} -> {totals['parts_after']}, "
                  f"rows {totals['rows_before']} -> {totals['rows_after']}, tombstones dropped {totals['tombstones_dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
