"""``asr-assets`` command line.

    asr-assets [--debug] materialize [--manifests PATH]... [--output DIR] [--frontend NAME]... [--workers N]
                           [--plugin MODULE]... [--n-fft N --hop-length N ...] [--source-base DIR]
                           [--confine-audio [DIR]] [--no-ffmpeg-fallback] [--fail-fast]
    asr-assets frontends
    asr-assets compact [--output DIR] [--frontend NAME]... [--split SPLIT]...
    asr-assets export [--output DIR] --split SPLIT [--frontend NAME] --backend NAME --to DIR

``materialize`` runs the whole graph through Dagster against the instance in ``DAGSTER_HOME``
(default ``./dagster_home``): one run per split of ``record_cache``, then one run per split
covering all 64 shards of every enabled frontend. Runs, lineage and metadata then show in
``dagster dev``. Progress, including the Dagster run log, goes to stdout; stderr carries only
problems. Exit status: 0 when the graph is complete (utterances that failed are in
``<output>/reports/``), 1 when a run failed, 2 on an error the user can act on: a bad setting or
flag (unknown frontend, ``--workers 0``, an ``--output`` that is a file or cannot be written, a
missing manifest), or manifests that give no record at all. Such an error is one line on stderr
(``--debug`` adds the traceback).

Start-up imports nothing heavy: numpy, scipy, pyarrow and dagster are imported by the commands
that use them, so ``asr-assets --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .errors import AsrAssetsError, ConfigError, ManifestError
from .settings import SPLITS, Settings

_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _one_line(text: object) -> str:
    """``text`` with every line break (and the blanks around it) folded into one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text).strip())


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_bool.__name__ = "bool"  # argparse names the type in "invalid bool value: ..."


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value} (leave --workers out to use every core)")
    return value


#: Defaults quoted in the override help, as ``(squeezeformer, zipformer)``; test_cli checks them
#: against the frontends' configs (kept here so ``--help`` needs no frontend import).
HELP_DEFAULTS = {
    "sample_rate": (16000, 16000), "n_fft": (400, 400), "win_length": (400, 400), "hop_length": (160, 160),
    "n_mels": (80, 80), "preemphasis": (0.97, 0.0), "normalize_signal": (True, False),
    "normalize_feature": (True, False), "normalize_per_frame": (False, False),
}
#: w2v-bert defaults of the flags it accepts (``--n-mels`` sets its ``feature_size``).
W2V_BERT_HELP_DEFAULTS = {"sample_rate": 16000, "n_mels": 80}


def _default(key: str) -> str:
    squeeze, zip_ = HELP_DEFAULTS[key]
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return f"default: {text(squeeze)}" if squeeze == zip_ else f"default: squeezeformer {text(squeeze)}, zipformer {text(zip_)}"


#: flag -> (type, metavar, help); every flag sets the config field of the same name.
_OVERRIDES = {
    "--sample-rate": (int, "HZ", "working sample rate in Hz; input at other rates is resampled "
                                 f"({_default('sample_rate')} Hz; every frontend)"),
    "--n-fft": (int, "N", "FFT size and frame length in samples, also sets --win-length unless given "
                          f"({_default('n_fft')} samples = 25 ms at 16 kHz)"),
    "--win-length": (int, "N", "Hann window length in samples, at most --n-fft, centred in the frame "
                               "(default: --n-fft)"),
    "--hop-length": (int, "N", f"frame shift in samples ({_default('hop_length')} samples = 10 ms at 16 kHz)"),
    "--n-mels": (int, "N", f"mel bands = feature columns ({_default('n_mels')}; w2v-bert: Kaldi bands, "
                           f"default: {W2V_BERT_HELP_DEFAULTS['n_mels']}, output twice as wide)"),
    "--preemphasis": (float, "C", "pre-emphasis coefficient c of y[n] = x[n] - c*x[n-1], in [0, 1], 0 turns it off "
                                  f"(unitless; {_default('preemphasis')})"),
    "--normalize-signal": (_bool, "BOOL", "remove the waveform's mean and scale its peak to 1, true or false "
                                          f"({_default('normalize_signal')})"),
    "--normalize-feature": (_bool, "BOOL", "standardize each mel column over time (zero mean, unit std), true or "
                                           f"false ({_default('normalize_feature')})"),
    "--normalize-per-frame": (_bool, "BOOL", "with --normalize-feature, standardize each frame over its mel bands "
                                             f"instead, true or false ({_default('normalize_per_frame')})"),
}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asr-assets", description="Record and feature caches for ASR training.")
    debug_help = "on an error, print the traceback too (default: one line on stderr)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{materialize,frontends,compact,export}")
    mat = sub.add_parser("materialize", help="materialize the whole graph (record cache, then feature shards)")
    mat.add_argument("--manifests", action="append", metavar="PATH",
                     help="manifest file or folder; repeatable (default: $ASR_ASSETS_MANIFESTS or the bundled sample)")
    mat.add_argument("--validation-manifests", action="append", metavar="PATH",
                     help="external validation source; repeatable (then every row of --manifests goes to train)")
    mat.add_argument("--output", metavar="DIR", help="output root (default: $ASR_ASSETS_OUTPUT or artifacts/)")
    mat.add_argument("--frontend", action="append", metavar="NAME",
                     help="frontend to cache; repeatable (default: $ASR_ASSETS_FRONTENDS or squeezeformer; "
                          "list: asr-assets frontends)")
    mat.add_argument("--plugin", action="append", metavar="MODULE",
                     help="import MODULE first (it registers frontends); repeatable (default: $ASR_ASSETS_PLUGINS)")
    over = mat.add_argument_group(
        "frontend overrides",
        "Upstream train.py flags. Each applies to every enabled frontend and changes its cache key. "
        "squeezeformer and zipformer take all of them; w2v-bert only --sample-rate and --n-mels; "
        "ludwig-* only --sample-rate. Sample counts are at --sample-rate.")
    for flag, (kind, metavar, text) in _OVERRIDES.items():
        over.add_argument(flag, type=kind, metavar=metavar, help=text)
    mat.add_argument("--workers", type=_workers, metavar="N",
                     help="feature-extraction processes, at least 1 (default: $ASR_ASSETS_WORKERS or every core)")
    mat.add_argument("--source-base", metavar="DIR", help="base folder of relative audio paths instead of each manifest root")
    mat.add_argument("--no-ffmpeg-fallback", action="store_true", help="decode with libsndfile only (no PyAV)")
    mat.add_argument("--confine-audio", action="append", nargs="?", const="", metavar="DIR",
                     help="refuse audio outside the manifest roots (or outside DIR; repeatable) and report it")
    mat.add_argument("--fail-fast", action="store_true", help="fail the run on the first utterance that cannot be featurized")
    mat.add_argument("--utterance-timeout", type=_positive_seconds, metavar="SECONDS",
                     help="wall-clock floor per utterance (decode + features); a worker past its limit, "
                          "max(SECONDS, 10 s per audio second), is killed and the utterance reported as "
                          "'timeout' (default: $ASR_ASSETS_UTTERANCE_TIMEOUT_S or 60)")
    fe = sub.add_parser("frontends", help="list the registered frontends with their feature dim and cache hash")
    comp = sub.add_parser("compact", help="merge each shard's parts into one (newest row per key, tombstones dropped)")
    comp.add_argument("--output", metavar="DIR", help="output root (default: $ASR_ASSETS_OUTPUT or artifacts/)")
    comp.add_argument("--frontend", action="append", metavar="NAME",
                      help="only this frontend; repeatable (default: every frontend found in the parts)")
    comp.add_argument("--split", action="append", choices=SPLITS, help="split; repeatable (default: all)")
    exp = sub.add_parser("export", help="write one frontend's features of a split into another store backend "
                                        "(numpy_memmap, hdf5), in record order, atomically")
    exp.add_argument("--output", metavar="DIR", help="output root holding feature-cache/ and record_cache/ "
                                                     "(default: $ASR_ASSETS_OUTPUT or artifacts/)")
    exp.add_argument("--split", required=True, choices=SPLITS, help="split to export")
    exp.add_argument("--frontend", metavar="NAME", default="squeezeformer",
                     help="frontend whose features to export, a name or a hash12 (default: squeezeformer)")
    exp.add_argument("--backend", required=True, metavar="NAME", help="storage backend: numpy_memmap or hdf5")
    exp.add_argument("--to", required=True, metavar="DIR", help="the new store's folder (must not exist, or be empty)")
    for command in (mat, fe, comp, exp):  # --debug also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Settings of ``materialize``, checked as far as possible before Dagster starts.

    Raises:
        AsrAssetsError, ValueError: a setting the user must fix (one-line message).
    """
    from .manifests import discover_manifests

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _OVERRIDES}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings.from_env(
        manifests=args.manifests, validation_manifests=args.validation_manifests, output=args.output,
        frontends=args.frontend, plugins=args.plugin, workers=args.workers, source_base=args.source_base,
        ffmpeg_fallback=False if args.no_ffmpeg_fallback else None, fail_fast=True if args.fail_fast else None,
        confine_audio_paths=True if args.confine_audio else None,
        allowed_audio_roots=tuple(d for d in (args.confine_audio or []) if d) or None,
        utterance_timeout_s=args.utterance_timeout,
    )
    if overrides:
        settings = settings.with_(frontend_overrides={name: overrides for name in settings.frontends})
    for source in (*settings.manifests, *settings.validation_manifests):
        discover_manifests(source)  # raises ManifestError naming the source
    for name in settings.frontends:
        settings.frontend(name)  # raises UnknownFrontendError with suggestions, or a bad override
    if settings.source_base and not Path(settings.source_base).is_dir():
        raise ConfigError(f"--source-base {settings.source_base!r} is not a folder")
    _check_output(settings.output_path, "--output" if args.output else
                  "ASR_ASSETS_OUTPUT" if os.environ.get("ASR_ASSETS_OUTPUT") else "the default output")
    return settings


def _check_output(path: Path, what: str = "--output") -> None:
    """Create the output folder ``path`` if needed and make sure files can be written in it.

    Raises:
        ConfigError: ``path`` is a file, cannot be created or is not writable (``what`` names
            where the path came from).
    """
    import tempfile

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from exc
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from exc


_INSTANCE_CONFIG = "telemetry:\n  enabled: false\n"
_INIT_LOCK = ".asr_assets_init.lock"


def _dagster_home() -> str:
    """``DAGSTER_HOME`` (default ``./dagster_home``), created with a telemetry-off ``dagster.yaml``
    when new, and exported; checked before dagster is imported.

    Safe when several processes start on one fresh folder at once: ``mkdir`` tolerates the
    folder appearing, and ``dagster.yaml`` appears whole or not at all (written to a temporary
    file and hard-linked into place, which fails if another process got there first; an
    existing file is never overwritten).

    Raises:
        ConfigError: the folder or its config cannot be created.
    """
    from ._fs import remove_stale_tmp, tmp_path_for

    home = str(Path(os.environ.get("DAGSTER_HOME") or "dagster_home").resolve())
    config = Path(home) / "dagster.yaml"
    try:
        if Path(home).exists() and not Path(home).is_dir():
            raise NotADirectoryError(20, "is a file, not a folder")
        Path(home).mkdir(parents=True, exist_ok=True)
        if not config.exists():  # a fresh instance: local SQLite storage, no telemetry
            remove_stale_tmp(Path(home), prefix=config.name)  # of a process killed right here
            tmp = tmp_path_for(config)
            tmp.write_text(_INSTANCE_CONFIG, encoding="utf-8")
            try:
                os.link(tmp, config)
            except FileExistsError:
                pass  # another process wrote it first: same content, or the user's own
            except OSError:  # no hard links on this file system: an atomic replace, same content
                if not config.exists():
                    os.replace(tmp, config)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"DAGSTER_HOME {home!r} cannot be used: {exc.strerror or exc}") from exc
    os.environ["DAGSTER_HOME"] = home
    return home


def _dagster_instance():
    """The instance in ``DAGSTER_HOME`` (see :func:`_dagster_home`).

    Dagster creates its SQLite tables when the instance is first opened and fails ("table runs
    already exists") when two processes do that at once on a fresh folder, so opening is
    serialized across processes by an ``flock`` on ``DAGSTER_HOME/.asr_assets_init.lock``
    (released when the storage exists; runs themselves are not serialized).
    """
    import dagster as dg

    from ._fs import file_lock

    home = _dagster_home()
    with file_lock(Path(home) / _INIT_LOCK):
        return dg.DagsterInstance.get()


def _manifest_files(settings: Settings) -> list[str]:
    from .manifests import discover_manifests

    files: list[str] = []
    for source in dict.fromkeys((*settings.manifests, *settings.validation_manifests)):
        files.extend(str(p) for p in discover_manifests(source) if str(p) not in files)
    return files


def materialize(settings: Settings) -> int:
    """Run the whole graph; returns the process exit status.

    The Dagster run log goes to stdout (stderr carries only problems).

    Raises:
        ConfigError: ``DAGSTER_HOME`` cannot be used.
        ManifestError: the manifests give no record in any split (nothing to featurize); the
            message names the manifest files read and the reports with the reasons.
    """
    import contextlib
    import warnings

    from .pipeline import feature_shards_with_work, record_cache_is_up_to_date
    from .record_cache import RecordStore

    _dagster_home()
    print(f"asr-assets: manifests {list(settings.manifests)} -> {settings.output_path} "
          f"(frontends {', '.join(settings.frontends)}; DAGSTER_HOME={os.environ['DAGSTER_HOME']})", flush=True)

    def shards_with_work() -> dict[str, list[int]]:
        busy = {}
        for split in SPLITS:
            shards = sorted({s for name in settings.frontends for s in feature_shards_with_work(settings, name, split)})
            if shards:
                busy[split] = shards
        return busy

    # Skip conditions, checked before Dagster is even imported: a split whose record cache is up
    # to date, and a split whose shards have nothing to compute, start no run; a no-op over an
    # unchanged corpus reads no manifest, writes no file and records no run.
    stale = [split for split in SPLITS if not record_cache_is_up_to_date(settings, split)]
    if not stale and not any(len(RecordStore(settings.record_cache_path(s))) for s in SPLITS):
        _print_summary(settings)
        raise ManifestError(_no_records_message(settings))
    if not stale and not shards_with_work():
        print("asr-assets: up to date (manifests, settings and code unchanged; every record has its "
              "features or a reported failure): no run started", flush=True)
        _print_summary(settings)
        return 0

    import dagster as dg

    from .definitions import build_definitions
    from .defs.assets import feature_asset_name
    from .defs.jobs import FEATURES_JOB, RECORD_CACHE_JOB, run_tags
    from .defs.partitions import feature_partition_key

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    instance = _dagster_instance()
    defs = build_definitions(settings)

    def run(job_name: str, start: str, end: str, what: str, tags: dict[str, str]) -> bool:
        one = start == end  # a single partition: per-partition data version and check history
        tags = {"asr/cli": "materialize", **tags}
        if not one:
            tags.update({"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end})
        job = defs.resolve_job_def(job_name)  # a named job, so the Runs page says what ran
        with contextlib.redirect_stderr(sys.stdout):  # Dagster's console log is progress, not a problem
            result = job.execute_in_process(
                instance=instance, raise_on_error=False, run_config=_QUIET_LOGS,
                partition_key=start if one else None, tags=tags,
            )
        sys.stdout.flush()
        if not result.success:
            print(f"asr-assets: run {result.run_id} ({what}) FAILED; see its log on stdout or in `dagster dev`",
                  file=sys.stderr)
        return result.success

    ok = all([run(RECORD_CACHE_JOB, split, split, f"record_cache[{split}]", run_tags("record_cache", split))
              for split in stale])
    if ok and not any(len(RecordStore(settings.record_cache_path(s))) for s in SPLITS):
        _print_summary(settings)
        raise ManifestError(_no_records_message(settings))
    busy: dict[str, list[int]] = {}
    if ok:
        busy = shards_with_work()
        assets = ",".join(feature_asset_name(name) for name in settings.frontends)
        for split, shards in busy.items():  # one run per split over the range of shards with work
            lo, hi = shards[0], shards[-1]
            ok = run(FEATURES_JOB, feature_partition_key(split, lo), feature_partition_key(split, hi),
                     f"features of {split}", run_tags(assets, split, shards=f"{lo:02d}-{hi:02d}")) and ok
    _print_summary(settings)
    return 0 if ok else 1


def _no_records_message(settings: Settings) -> str:
    files = _manifest_files(settings)
    _, problems = _records_reports(settings)
    # file-level entries, not skipped TSV lines ("line N skipped: ...", see manifests.iter_manifest_rows)
    broken = len({p.get("manifest") for p in problems if not str(p.get("error", "")).startswith("line ")})
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    whole = f"; {broken} with a file-level problem" if broken else ""
    reports = settings.output_path / "reports" / f"records-{{{','.join(SPLITS)}}}.jsonl"
    return (f"no records to cache: the manifests gave 0 usable rows ({plural(len(files), 'file')} read: {shown}{whole}); "
            f"reasons per file and row in {reports}")


def _records_reports(settings: Settings) -> tuple[dict[str, int], list[dict]]:
    """From ``reports/records-<split>.jsonl``: rows not cached per split, and the manifest-level
    entries (no utterance id: unreadable file, no usable columns, skipped line), each once (they
    repeat in every split's report)."""
    import json

    rows: dict[str, int] = {}
    problems: dict[tuple, dict] = {}
    for split in SPLITS:
        path = settings.records_report_path(split)
        if not path.exists():
            continue
        rows[split] = 0
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                if entry.get("utterance_id") is None:
                    problems.setdefault((entry.get("manifest"), entry.get("error")), entry)
                else:
                    rows[split] += 1
    return rows, list(problems.values())


def _print_summary(settings: Settings) -> None:
    from .record_cache import RecordStore

    reports = settings.output_path / "reports"
    rejected, problems = _records_reports(settings)
    for split in SPLITS:
        path = settings.record_cache_path(split)
        if path.exists():
            print(f"  {split:<10} {len(RecordStore(path)):>7} records, {rejected.get(split, 0)} manifest rows not cached")
    for entry in problems[:5]:
        print(f"  manifest problem: {entry.get('error')}")
    if len(problems) > 5:
        print(f"  ... and {len(problems) - 5} more manifest problems in {reports}/records-<split>.jsonl")
    failures = sum(sum(1 for _ in open(p, encoding="utf-8")) for p in reports.glob("*/*/shard_*.jsonl")) if reports.exists() else 0
    print(f"  feature failures: {failures} (reports under {reports})", flush=True)


def frontends(args: argparse.Namespace) -> int:
    """``asr-assets frontends``: name, feature dim and cache hash of every registered frontend."""
    from .frontends import available_frontends, get_frontend

    for name in available_frontends():
        fe = get_frontend(name)
        print(f"{name:<16} dim {fe.feature_dim:<5} hash {fe.frontend_hash()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``asr-assets``; returns the exit status (argparse errors exit 2 themselves)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "frontends":
            return frontends(args)
        if args.command == "compact":
            return compact(args)
        if args.command == "export":
            return export(args)
        try:
            settings = _settings(args)
        except ValueError as exc:  # a bad value deep in a config (FeatureConfigError, ConfigError are ValueErrors too)
            if isinstance(exc, AsrAssetsError):
                raise
            raise ConfigError(str(exc)) from exc
        return materialize(settings)
    except AsrAssetsError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        print(f"asr-assets: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


def compact(args: argparse.Namespace) -> int:
    """``asr-assets compact``: one part per shard and frontend; safe while readers run.

    Raises:
        AsrAssetsError: a bad setting, an unknown ``--frontend`` or a missing output folder.
    """
    settings = Settings.from_env(output=args.output)
    hashes = {settings.frontend(name).frontend_hash() for name in args.frontend} if args.frontend else None
    if not settings.output_path.is_dir():
        raise ConfigError(f"output folder {str(settings.output_path)!r} does not exist (nothing to compact)")
    from .feature_cache import compact_split

    for split in args.split or SPLITS:
        for frontend_hash, totals in compact_split(settings.feature_split_root(split), hashes).items():
            print(f"{split} [{frontend_hash}]: parts {totals['parts_before']} -> {totals['parts_after']}, "
                  f"rows {totals['rows_before']} -> {totals['rows_after']}, tombstones dropped {totals['tombstones_dropped']}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``asr-assets export``: the features of one split and frontend as a ``--backend`` store.

    Reads ``<output>/feature-cache/<split>`` for the utterances of ``<output>/record_cache/<split>.jsonl``
    (in record order), skips records without features and prints one summary line.

    Raises:
        AsrAssetsError: a missing cache, an unknown frontend or backend, a ``--to`` that is a
            file or a folder that is not empty.
    """
    settings = Settings.from_env(output=args.output)
    from .stores import available_stores, export_feature_store

    frontend = args.frontend
    if not re.fullmatch(r"[0-9a-f]{12}", frontend):
        frontend = settings.frontend(frontend)  # UnknownFrontendError with "did you mean"
    if args.backend not in available_stores(writable=True):
        raise ConfigError(f"unknown --backend {args.backend!r}; available: {', '.join(available_stores(writable=True))}")
    split_root, records = settings.feature_split_root(args.split), settings.record_cache_path(args.split)
    if not (split_root / "feature_shards").is_dir():
        raise ConfigError(f"no feature cache at {str(split_root)!r}: run asr-assets materialize --output "
                          f"{str(settings.output_path)!r} first")
    if not records.is_file():
        raise ConfigError(f"no record cache at {str(records)!r}: run asr-assets materialize --output "
                          f"{str(settings.output_path)!r} first")
    from .stores.sharded_parquet import frontends_in_parts

    cached = frontends_in_parts(split_root)  # every part names its frontend: refuse one that is not there
    wanted = frontend if isinstance(frontend, str) else frontend.frontend_hash()
    if cached and None not in cached and wanted not in cached:
        held = ", ".join(f"{m['frontend'] or '?'} ({h})" for h, m in sorted(cached.items()))
        raise ConfigError(f"the feature cache {str(split_root)!r} holds no features of {args.frontend!r} ({wanted}); "
                          f"it holds: {held}")
    summary = export_feature_store(split_root, args.to, backend=args.backend, frontend=frontend, record_cache=records)
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    what = f"{summary.frontend} {summary.frontend_hash}" if summary.frontend else summary.frontend_hash
    print(f"{args.split} [{what}] -> {summary.path} "
          f"({summary.storage_type}): {plural(summary.written, 'utterance')} written, {summary.missing} without "
          f"features (skipped), {summary.nbytes / 1e6:.1f} MB, {summary.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
