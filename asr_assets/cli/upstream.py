"""Upstream's command lines as drop-ins (spec §6): ``asr-assets record-cache`` (alias
``build-record-cache``) for ``asr-features record-cache``, and ``asr-assets warm`` for the
feature warmer ``asr-features --input ... --cache-dir ...``.

Both run the library the graph runs (:func:`asr_assets.pipeline.build_record_cache`, the
extraction workers through :func:`asr_assets.warm.warm_feature_cache`), log like upstream
(``asr_assets.logs``: info by default, ``-v``/``-vv`` or ``ASR_ASSETS_LOG``) to stderr, and, when
``DAGSTER_HOME`` names an existing folder, record what they wrote as runless materializations of
``record_cache[<split>]`` / ``<frontend>_features[<shard>|<split>]``. Without it they import no
Dagster at all. Every upstream flag is either honoured or refused in one line (exit 2); none is
ignored. Exit status: 0 done (rows that could not be featurized are logged as warnings, as
upstream), 1 ``warm --fail-fast`` stopped at a failing row, 2 a setting to fix.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from ..errors import AsrAssetsError, ConfigError
from . import _common

logger = logging.getLogger("asr_assets.cli")

# ----------------------------------------------------------------------------- record-cache

#: record-cache flag (dest) -> (RecordConfig field, type, metavar, default, help).
_RECORD_FLAGS = {
    "seed": ("seed", _common.count(0), "N", 13, "split seed: sha256(f'{seed}:{speaker or utterance id}')"),
    "val_fraction": ("val_fraction", float, "F", 0.1, "share of speakers hashed into validation"),
    "test_fraction": ("test_fraction", float, "F", 0.1, "share hashed into test (never written, as upstream)"),
    "min_transcript_chars": ("min_transcript_chars", int, "N", 1, "shortest normalized transcript, code points"),
    "max_transcript_chars": ("max_transcript_chars", int, "N", 400, "longest normalized transcript, code points"),
    "max_symbol_ratio": ("max_symbol_ratio", float, "F", 0.5, "largest share of symbol characters (unitless)"),
    "min_audio_duration_sec": ("min_audio_duration_s", float, "S", 0.01, "shortest audio, seconds"),
    "max_audio_duration_sec": ("max_audio_duration_s", float, "S", 30.0, "longest audio, seconds"),
    "min_chars_per_second": ("min_chars_per_second", float, "F", 0.0, "alignment bound: non-blank chars per second"),
    "max_chars_per_second": ("max_chars_per_second", float, "F", math.inf, "alignment bound: non-blank chars per second"),
    "min_words_per_second": ("min_words_per_second", float, "F", 0.0, "alignment bound: words per second"),
    "max_words_per_second": ("max_words_per_second", float, "F", math.inf, "alignment bound: words per second"),
    "min_duration_per_char": ("min_duration_per_char", float, "S", 0.0, "alignment bound: seconds per non-blank char"),
    "max_duration_per_char": ("max_duration_per_char", float, "S", math.inf, "alignment bound: seconds per non-blank char"),
    "min_duration_per_word": ("min_duration_per_word", float, "S", 0.0, "alignment bound: seconds per word"),
    "max_duration_per_word": ("max_duration_per_word", float, "S", math.inf, "alignment bound: seconds per word"),
}
#: pairs checked as upstream's validate_record_cache_cli does: (min flag, max flag).
_BOUNDS = (("min_transcript_chars", "max_transcript_chars"), ("min_audio_duration_sec", "max_audio_duration_sec"),
           ("min_chars_per_second", "max_chars_per_second"), ("min_words_per_second", "max_words_per_second"),
           ("min_duration_per_char", "max_duration_per_char"), ("min_duration_per_word", "max_duration_per_word"))
#: Splits upstream writes (the test split is only a hash range).
RECORD_CACHE_SPLITS = ("train", "validation")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_record_cache_parser(sub) -> argparse.ArgumentParser:
    rc = sub.add_parser(
        "record-cache", aliases=["build-record-cache"],
        help="upstream `asr-features record-cache`: train.jsonl + validation.jsonl (+ sidecars, blobs) in "
             "--record-cache-dir",
        description="Build the record cache the training loader reads (spec §1): <dir>/train.jsonl and "
                    "<dir>/validation.jsonl with their sidecars and <split>_audio_blobs/, through the same "
                    "record builder as the graph. Rows not cached are listed in <dir>/reports/records-<split>.jsonl.")
    rc.add_argument("--dataset-source", action="append", required=True, metavar="PATH",
                    help="manifest file (.tsv/.parquet) or folder; repeatable, at least one")
    rc.add_argument("--validation-dataset-source", action="append", metavar="PATH",
                    help="validation-only source; repeatable (then every usable --dataset-source row goes to train)")
    rc.add_argument("--record-cache-dir", required=True, metavar="DIR", help="folder to write (created if missing)")
    rc.add_argument("--max-train-samples", type=_common.count(0), metavar="N",
                    help="cap on train.jsonl records, sources read in order (default: none)")
    rc.add_argument("--max-val-samples", type=_common.count(0), metavar="N",
                    help="cap on validation.jsonl records (default: none)")
    filters = rc.add_argument_group("split and filters", "Upstream's defaults (spec §1.6, §1.7).")
    for dest, (_, kind, metavar, default, text) in _RECORD_FLAGS.items():
        filters.add_argument(_flag(dest), dest=dest, type=kind, metavar=metavar, help=f"{text} (default: {default})")
    rc.add_argument("--tokenizer", choices=("character", "sentencepiece"),
                    help="only decides lowercasing: character lowercases transcripts (default: sentencepiece, "
                         "case kept)")
    rc.add_argument("--require-readable-audio", action="store_true",
                    help="drop rows with neither embedded bytes, an http(s) URL nor an existing local file "
                         "(default: off, as upstream; `materialize` always does this)")
    rc.add_argument("--require-audio-bytes", action="store_true", help="drop rows without embedded audio bytes")
    rc.add_argument("--progress-interval", type=_common.count(0), default=1000, metavar="N",
                    help="log progress every N manifest rows per split, 0 never (default: 1000)")
    rc.add_argument("--threads", type=_common.count(0), metavar="N",
                    help="accepted for compatibility: records are built on one thread here, the output does "
                         "not depend on it (default: 0)")
    return rc


def _record_cache_settings(args: argparse.Namespace):
    """Settings of ``record-cache``, checked with upstream's rules; raises ConfigError naming the flag."""
    from ..manifests import discover_manifests
    from ..settings import Settings

    given = {dest: getattr(args, dest) for dest in _RECORD_FLAGS if getattr(args, dest) is not None}
    value = {dest: given.get(dest, spec[3]) for dest, spec in _RECORD_FLAGS.items()}
    if value["val_fraction"] < 0 or value["test_fraction"] < 0:
        raise ConfigError("--val-fraction and --test-fraction must be non-negative")
    if not value["val_fraction"] + value["test_fraction"] < 1:
        raise ConfigError(f"--val-fraction + --test-fraction must be < 1, got {value['val_fraction']!r} + "
                          f"{value['test_fraction']!r}")
    if value["min_transcript_chars"] < 1:
        raise ConfigError(f"--min-transcript-chars must be >= 1, got {value['min_transcript_chars']}")
    if not value["min_audio_duration_sec"] > 0:
        raise ConfigError(f"--min-audio-duration-sec must be > 0, got {value['min_audio_duration_sec']!r}")
    for low, high in _BOUNDS:
        if not value[high] >= value[low]:
            raise ConfigError(f"{_flag(high)} must be >= {_flag(low)}, got {value[high]!r} < {value[low]!r}")
    for dest, number in value.items():
        if isinstance(number, float) and math.isnan(number):
            raise ConfigError(f"{_flag(dest)} must be a number, got nan")
    options = {_RECORD_FLAGS[dest][0]: v for dest, v in given.items()}
    if args.tokenizer == "character":
        options["lowercase"] = True
    if args.require_audio_bytes:
        options["require_audio_bytes"] = True
    caps = {split: n for split, n in (("train", args.max_train_samples), ("validation", args.max_val_samples))
            if n is not None}
    if caps:
        options["max_records"] = caps
    directory = Path(args.record_cache_dir).resolve()
    settings = Settings.from_env(
        manifests=tuple(args.dataset_source), validation_manifests=tuple(args.validation_dataset_source or ()),
        output=str(directory), record_cache_dir=str(directory),
        require_readable_audio=bool(args.require_readable_audio), record_options=options)
    for source in (*settings.manifests, *settings.validation_manifests):
        discover_manifests(source)  # ManifestError naming a missing source, before anything is written
    from ..pipeline import record_config

    record_config(settings)  # anything RecordConfig refuses, before anything is written
    _common.check_output(directory, "--record-cache-dir")
    return settings


def record_cache(args: argparse.Namespace) -> int:
    """``asr-assets record-cache``: ``train.jsonl`` and ``validation.jsonl`` in ``--record-cache-dir``.

    Raises:
        AsrAssetsError: a flag value to fix, a missing source, an unusable ``DAGSTER_HOME``, or a
            split that came out empty (upstream refuses that too, after writing it).
    """
    settings = _record_cache_settings(args)
    instance = _common.configured_dagster_instance()
    from ..pipeline import build_record_caches

    external = bool(settings.validation_manifests)
    logger.info("building record cache dir=%s train_sources=%d validation_sources=%d external_validation=%s "
                "lowercase_transcripts=%s threads=1", settings.record_cache_dir, len(settings.manifests),
                len(settings.validation_manifests), external, args.tokenizer == "character")
    if args.threads not in (None, 0, 1):
        logger.info("--threads %d: the record builder reads the manifests on one thread (the output is the same)",
                    args.threads)
    if external and (args.val_fraction is not None or args.test_fraction is not None):
        logger.warning("--val-fraction/--test-fraction do not apply with --validation-dataset-source: every usable "
                       "row of the dataset sources goes to train.jsonl, every one of the validation sources to "
                       "validation.jsonl (as upstream)")
    results = build_record_caches(settings, RECORD_CACHE_SPLITS, log=logger.info,  # one pass over the manifests
                                  progress_interval=args.progress_interval, progress_level=logging.INFO)
    if instance is not None:
        events = [("record_cache", split, {
            "dagster/row_count": r.summary.utterances, "audio_hours": round(r.summary.audio_seconds / 3600, 4),
            "rows_not_cached": len(r.rejections), "path": Path(r.summary.path), "report": Path(r.report_path),
            "sha256": r.summary.sha256, "up_to_date": r.up_to_date, "manifests": list(settings.manifests),
        }, {"dagster/data_version": r.summary.sha256[:16]}) for split, r in results.items()]
        n = _common.record_materializations(instance, events, "record-cache")
        logger.info("recorded %d materializations of record_cache in DAGSTER_HOME", n)
    logger.info("record cache complete dir=%s", settings.record_cache_dir)
    empty = [split for split, r in results.items() if r.summary.utterances == 0]
    if empty:
        raise ConfigError(f"split {empty[0]!r} is empty after applying the split fractions and filters across all "
                          f"dataset sources (reasons per row in {results[empty[0]].report_path})")
    return 0


# ----------------------------------------------------------------------------- warm

#: --w2v-* flag (dest) -> (w2v-bert override key, type, metavar, help); defaults in _common.W2V_FLAG_DEFAULTS.
_W2V_FLAGS = {
    "w2v_model_source": ("model_source", str, "NAME", "model id or path, only part of the cache key"),
    "w2v_feature_size": ("feature_size", int, "N", "Kaldi mel bands (--n-mels overrides it, as upstream)"),
    "w2v_stride": ("stride", int, "N", "frames stacked per output row"),
    "w2v_padding_value": ("padding_value", float, "F", "value of the frames padded to a multiple of the stride"),
}
#: Override flags the w2v-bert frontend takes (upstream silently ignores the others for it).
_W2V_AUDIO_FLAGS = ("--sample-rate", "--n-mels")


def add_warm_parser(sub) -> argparse.ArgumentParser:
    warm = sub.add_parser(
        "warm", help="upstream feature warmer `asr-features --input ... --cache-dir ...`: features of one "
                     "input into one split cache root",
        description="Compute the features of a Parquet manifest (--input), of every Parquet file below "
                    "folders (--input-folder) or of a record-cache JSONL (--input-record-cache) into "
                    "--cache-dir/feature_shards/features_NN/part_*.parquet, keys and payloads as upstream "
                    "(spec §3). Keys already in the cache are not computed again.")
    modes = warm.add_argument_group("input (exactly one)")
    modes.add_argument("--input", metavar="FILE", help="one Parquet manifest; relative audio paths against its folder")
    modes.add_argument("--input-folder", action="append", metavar="DIR",
                       help="every *.parquet below DIR (recursive, sorted); relative audio paths against DIR; repeatable")
    modes.add_argument("--input-record-cache", metavar="JSONL",
                       help="a record-cache split such as train.jsonl: exactly the training loader's keys")
    warm.add_argument("--cache-dir", required=True, metavar="DIR",
                      help="split cache root to write, e.g. artifacts/feature-cache/train (created if missing)")
    warm.add_argument("--source-base", metavar="DIR", help="base of relative audio paths of every Parquet input")
    warm.add_argument("--frontend", default="squeezeformer", metavar="NAME",
                      help="squeezeformer, zipformer, w2v-bert or any registered frontend (default: squeezeformer)")
    warm.add_argument("--limit", type=_common.count(0), metavar="N", help="stop after N input rows (default: all)")
    warm.add_argument("--num-shards", type=_common.count(1), default=64, metavar="N",
                      help="cache shards; must match the reader's (default: 64)")
    warm.add_argument("--batch-size", type=_common.count(1), default=1024, metavar="N",
                      help="rows read and featurized per batch (default: 1024)")
    warm.add_argument("--rows-per-part", type=_common.count(1), default=256, metavar="N",
                      help="rows per Parquet part of a shard (default: 256)")
    warm.add_argument("--fail-fast", action="store_true", help="stop at the first row that cannot be featurized (exit 1)")
    warm.add_argument("--threads", type=_common.count(0), default=0, metavar="N",
                      help="feature-extraction processes, 0 = $ASR_ASSETS_WORKERS or every core (default: 0)")
    warm.add_argument("--no-ffmpeg-fallback", action="store_true", help="decode with libsndfile only (no PyAV)")
    over = warm.add_argument_group(
        "frontend overrides", "Upstream's flags; each changes the cache key. squeezeformer and zipformer take all "
                              "of the audio ones; w2v-bert takes --sample-rate, --n-mels and the --w2v-* ones.")
    _common.add_override_flags(over)
    for dest, (key, kind, metavar, text) in _W2V_FLAGS.items():
        over.add_argument(_flag(dest), dest=dest, type=kind, metavar=metavar,
                          help=f"w2v-bert: {text} (default: {_common.W2V_FLAG_DEFAULTS[key]})")
    return warm


def _warm_frontend(args: argparse.Namespace):
    """The frontend of ``warm`` and the Settings it came from; raises ConfigError naming a flag that
    does not apply."""
    from ..settings import Settings

    name = args.frontend
    overrides = _common.overrides_from_args(args)
    w2v = {key: getattr(args, dest) for dest, (key, *_) in _W2V_FLAGS.items() if getattr(args, dest) is not None}
    if name == "w2v-bert":
        for flag in _common.OVERRIDES:
            if flag not in _W2V_AUDIO_FLAGS and flag[2:].replace("-", "_") in overrides:
                raise ConfigError(f"{flag} does not apply to --frontend w2v-bert (upstream ignores it there: "
                                  "it would change neither the features nor the key); leave it out")
        if "n_mels" in overrides and "feature_size" in w2v:
            raise ConfigError("--n-mels and --w2v-feature-size both set the w2v-bert mel bands; give one "
                              "(upstream silently takes --n-mels)")
        overrides.update(w2v)
    elif w2v:
        flag = _flag(next(dest for dest, (key, *_) in _W2V_FLAGS.items() if key in w2v))
        raise ConfigError(f"{flag} applies only to --frontend w2v-bert, not {name!r}")
    settings = Settings.from_env(frontends=(name,), frontend_overrides={name: overrides})
    return settings.frontend(name), settings


def warm(args: argparse.Namespace) -> int:
    """``asr-assets warm``: one input mode into one split cache root.

    Raises:
        AsrAssetsError: a flag to fix (one line, exit 2).
    """
    from ..settings import SPLITS

    modes = [bool(args.input), bool(args.input_folder), bool(args.input_record_cache)]
    if sum(modes) != 1:
        raise ConfigError("exactly one of --input, --input-folder, or --input-record-cache is required")
    if args.input_record_cache and args.source_base:
        raise ConfigError("--source-base does not apply to --input-record-cache (its audio paths are already "
                          "resolved; upstream ignores it there)")
    if args.source_base and not Path(args.source_base).is_dir():
        raise ConfigError(f"--source-base {args.source_base!r} is not a folder")
    frontend, settings = _warm_frontend(args)
    from ..warm import iter_parquet_batches, iter_record_cache_batches, parquet_inputs

    if args.input_record_cache:
        if not Path(args.input_record_cache).is_file():
            raise ConfigError(f"--input-record-cache must point to a JSONL file: {args.input_record_cache}")
        inputs = None
    else:
        inputs = parquet_inputs(args.input, args.input_folder or ())
    cache_dir = Path(args.cache_dir)
    _common.check_output(cache_dir, "--cache-dir")
    instance = _common.configured_dagster_instance()

    from ..extraction import ExtractionConfig
    from ..warm import warm_feature_cache

    workers = args.threads or settings.effective_workers
    config = ExtractionConfig(
        workers=workers, rows_per_part=args.rows_per_part, num_shards=args.num_shards,
        ffmpeg_fallback=not args.no_ffmpeg_fallback, max_decode_s=settings.max_decode_s, fail_fast=args.fail_fast,
        duration_tolerance=None, utterance_timeout_s=settings.utterance_timeout_s,
        timeout_per_audio_s=settings.timeout_per_audio_s)
    logger.info("feature extraction workers=%d (processes)", workers)
    common = (f"cache_dir={cache_dir} frontend={frontend.name} frontend_hash={frontend.frontend_hash()} "
              f"batch_size={args.batch_size} rows_per_part={args.rows_per_part} num_shards={args.num_shards} "
              f"fail_fast={args.fail_fast} ffmpeg_fallback={not args.no_ffmpeg_fallback}")
    if inputs is None:
        logger.info("starting record-cache feature warm input_record_cache=%s %s", args.input_record_cache, common)
        batches = iter_record_cache_batches(args.input_record_cache, batch_size=args.batch_size, limit=args.limit)
    else:
        logger.info("starting cache warm inputs=%d source_base=%s %s", len(inputs), args.source_base or "per-input",
                    common)
        logger.debug("resolved input parquet files: %s", [str(i.path) for i in inputs])
        batches = iter_parquet_batches(inputs, source_base=args.source_base, batch_size=args.batch_size,
                                       limit=args.limit)
    try:
        summary = warm_feature_cache(batches, cache_dir, frontend, config)
    except AsrAssetsError as exc:
        if not args.fail_fast or isinstance(exc, ConfigError):
            raise
        print(f"asr-assets: error: --fail-fast: {_common.one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    logger.info("complete scanned=%d written=%d skipped=%d (already cached %d, no audio source %d, failed %d) "
                "audio=%.3f h in %.1f s", summary.scanned, summary.written, summary.skipped, summary.cached,
                summary.no_audio, summary.failed, summary.audio_seconds / 3600, summary.seconds)
    if instance is not None:
        split = cache_dir.resolve().name
        if split not in SPLITS or args.num_shards != 64:
            logger.info("not recorded in DAGSTER_HOME: the graph's feature partitions are <shard 00-63>|<split>, and "
                        "--cache-dir %s %s", cache_dir, f"is not named after a split ({', '.join(SPLITS)})"
                        if split not in SPLITS else f"has {args.num_shards} shards")
        else:
            from ..defs.assets import feature_asset_name

            root = cache_dir.resolve()
            events = [(feature_asset_name(frontend.name), f"{shard:02d}|{split}", {
                "dagster/row_count": counts["written"] + counts["cached"], "computed": counts["written"],
                "skipped_already_cached": counts["cached"], "failures": counts["failed"],
                "parts_written": counts["parts"], "frontend_hash": frontend.frontend_hash(),
                "path": root / "feature_shards" / f"features_{shard:02d}",
            }, {"dagster/partition/shard": f"{shard:02d}", "dagster/partition/split": split})
                for shard, counts in sorted(summary.shards.items()) if counts["written"]]
            n = _common.record_materializations(instance, events, "warm")
            logger.info("recorded %d materializations of %s in DAGSTER_HOME", n, feature_asset_name(frontend.name))
    return 0
