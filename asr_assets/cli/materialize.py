"""``asr-assets materialize``: the whole graph through Dagster, against the instance in
``DAGSTER_HOME`` (default ``./dagster_home``).

One ``record_cache`` run over the splits that are not up to date (one pass over the manifests
builds them all), then ``features`` runs over the shards with work of every enabled frontend
(one run per stretch of busy shards: :func:`feature_ranges`), then one ``split_summary`` run
over the splits whose records or features changed. Runs, lineage and metadata then show in
``dagster dev``. The Dagster run log goes to stdout; stderr
carries problems and, in a terminal (or with ``--progress``), a tqdm bar over the utterances
being featurized (rate and ETA).

``--executor`` chooses where the steps run (:mod:`asr_assets.defs.executors`): ``in_process``
(default, today's behaviour: ``execute_in_process`` in this process), ``multiprocess`` (a step
subprocess per step) or ``celery`` (each step a Celery task on ``dagster-celery`` workers). With
``celery`` the feature runs are one run per shard partition (``NN|split``), up to
``--concurrent-runs`` orchestrated at once by processes spawned here, so the shards of a split spread
over all workers; it needs a shared instance (``DAGSTER_HOME`` with
``deploy/dagster-postgres.yaml``), a shared output (``s3://`` or one shared file system) and
``ASR_ASSETS_CELERY_BROKER`` / ``ASR_ASSETS_CELERY_BACKEND``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ManifestError
from ..settings import SPLITS, Settings
from ..storage import is_url
from . import _common

_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def add_parser(sub) -> argparse.ArgumentParser:
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
    _common.add_override_flags(over)
    mat.add_argument("--workers", type=_common.workers, metavar="N",
                     help="feature-extraction processes, at least 1 (default: $ASR_ASSETS_WORKERS or every core)")
    mat.add_argument("--source-base", metavar="DIR", help="base folder of relative audio paths instead of each manifest root")
    mat.add_argument("--no-ffmpeg-fallback", action="store_true", help="decode with libsndfile only (no PyAV)")
    mat.add_argument("--confine-audio", action="append", nargs="?", const="", metavar="DIR",
                     help="refuse audio outside the manifest roots (or outside DIR; repeatable) and report it")
    mat.add_argument("--fail-fast", action="store_true", help="fail the run on the first utterance that cannot be featurized")
    mat.add_argument("--utterance-timeout", type=_common.positive_seconds, metavar="SECONDS",
                     help="wall-clock floor per utterance (decode + features); a worker past its limit, "
                          "max(SECONDS, 10 s per audio second), is killed and the utterance reported as "
                          "'timeout' (default: $ASR_ASSETS_UTTERANCE_TIMEOUT_S or 60)")
    mat.add_argument("--executor", choices=("in_process", "multiprocess", "celery"), default="in_process",
                     help="where steps run: in this process (default), one subprocess per step, or as Celery tasks "
                          "on dagster-celery workers (one run per feature shard; needs a Postgres DAGSTER_HOME, "
                          "a shared output and $ASR_ASSETS_CELERY_BROKER / $ASR_ASSETS_CELERY_BACKEND)")
    mat.add_argument("--concurrent-runs", type=_common.workers, default=None, metavar="N",
                     help="with --executor celery: feature runs (one per shard) orchestrated at once "
                          "(default: 4; at least the number of workers, so none idles)")
    mat.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar over the utterances being featurized (rate, ETA) on stderr "
                          "(default: only when stderr is a terminal)")
    return mat


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings of ``materialize``, checked as far as possible before Dagster starts.

    Raises:
        AsrAssetsError, ValueError: a setting the user must fix (one-line message).
    """
    from ..errors import ConfigError
    from ..manifests import discover_manifests

    overrides = _common.overrides_from_args(args)
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
    if settings.source_base and not is_url(settings.source_base) and not Path(settings.source_base).is_dir():
        raise ConfigError(f"--source-base {settings.source_base!r} is not a folder")
    if not settings.output_is_remote:  # an object store has no folders to create; a PUT that fails says why
        _common.check_output(settings.output_path, "--output" if args.output else
                             "ASR_ASSETS_OUTPUT" if os.environ.get("ASR_ASSETS_OUTPUT") else "the default output")
    return settings


def _manifest_files(settings: Settings) -> list[str]:
    from ..manifests import discover_manifests

    files: list[str] = []
    for source in dict.fromkeys((*settings.manifests, *settings.validation_manifests)):
        files.extend(str(p) for p in discover_manifests(source) if str(p) not in files)
    return files


DEFAULT_CONCURRENT_RUNS = 4

#: Shards without work between two busy ones that one features run still spans. Measured on
#: the 1-hour corpus of benchmarks/end_to_end.py: a features run with nothing to compute costs
#: ~0.6 s for 1 partition, ~0.8 s for 15, ~1.0 s for 48 (~13 ms per partition: its planned and
#: materialization events, its metadata, the check's plan of it), and a run that computes also
#: starts the worker pool: ~16 idle shards of up to 3 splits cost about one extra run.
MERGE_GAP_SHARDS = 16


def feature_ranges(busy: dict[str, list[int]], merge_gap: int = MERGE_GAP_SHARDS) -> list[tuple[str, str]]:
    """``[(first, last)]`` partition keys of the features runs for the shards with work
    ``{split: [shard, ...]}``. A Dagster range of split x shard keys is a box, shards
    ``first..last`` times splits ``first..last`` (in the order train, validation, test), so each
    run is the box of a stretch of busy shards and the splits busy in it; a new stretch starts
    wherever more than ``merge_gap`` shards without work lie between two busy ones. Every busy
    partition is in exactly one box."""
    from ..defs.partitions import feature_partition_key

    shards = sorted({shard for split_shards in busy.values() for shard in split_shards})
    stretches: list[list[int]] = []
    for shard in shards:
        if stretches and shard - stretches[-1][-1] - 1 <= merge_gap:
            stretches[-1].append(shard)
        else:
            stretches.append([shard])
    ranges = []
    for stretch in stretches:
        lo, hi = stretch[0], stretch[-1]
        splits = [split for split in SPLITS if any(lo <= s <= hi for s in busy.get(split, []))]
        ranges.append((feature_partition_key(splits[0], lo), feature_partition_key(splits[-1], hi)))
    return ranges


def _record_state(settings: Settings, split: str) -> tuple | None:
    """What the split summary reads of a record cache, cheaply: the JSONL's sha256 (from its last
    build) and the size of its report; None when unknown."""
    from ..pipeline import record_cache_sha256

    report = settings.records_report_path(split)
    try:
        size = None if is_url(report) else report.stat().st_size
    except OSError:
        size = None
    sha = record_cache_sha256(settings, split)
    return None if sha is None or size is None else (sha, size)


def materialize(settings: Settings, progress: bool | None = None, executor: str = "in_process",
                concurrent_runs: int | None = None) -> int:
    """Run the whole graph; returns the process exit status.

    The Dagster run log goes to stdout; stderr carries problems and the feature progress bar
    (``progress``: True always, False never, None when stderr is a terminal; in-process only:
    elsewhere the utterances are featurized in other processes).

    ``executor``: ``in_process`` runs each job with ``execute_in_process``; ``multiprocess`` and
    ``celery`` with ``dagster.execute_job`` on a reconstructable job
    (:func:`asr_assets.defs.executors.reconstructable_job`). With ``celery`` every feature shard
    partition is its own run, ``concurrent_runs`` (default 4) of them orchestrated at once by
    spawned processes (each waits on its Celery tasks; the work is on the workers).

    Raises:
        ConfigError: ``DAGSTER_HOME`` cannot be used; ``celery`` without
            ``ASR_ASSETS_CELERY_BROKER``/``ASR_ASSETS_CELERY_BACKEND`` or with an ephemeral
            instance. (A local output path is allowed: it must then be one shared file system.)
        ManifestError: the manifests give no record in any split (nothing to featurize); the
            message names the manifest files read and the reports with the reasons.
    """
    import contextlib
    import warnings

    from ..pipeline import feature_shards_with_work, progress_bars, record_cache_is_up_to_date
    from ..record_cache import RecordStore

    _common.dagster_home()
    stderr = sys.stderr  # before Dagster's console log is redirected to stdout
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
    def no_records() -> bool:
        return not any(len(RecordStore(settings.record_cache_path(s))) for s in SPLITS)

    stale = [split for split in SPLITS if not record_cache_is_up_to_date(settings, split)]
    busy: dict[str, list[int]] | None = None  # shards with work, once the record caches are final
    if not stale:
        if no_records():
            _print_summary(settings)
            raise ManifestError(_no_records_message(settings))
        busy = shards_with_work()
    if busy == {}:
        print("asr-assets: up to date (manifests, settings and code unchanged; every record has its "
              "features or a reported failure): no run started", flush=True)
        _print_summary(settings)
        return 0

    if executor == "in_process":  # features, if any, are computed here: the workers' fork server
        from ..extraction import start_fork_server  # starts beside Dagster's import, not after it
        from ..summary import PLOT_MODULES

        start_fork_server(also=PLOT_MODULES)  # the split summary's plots are drawn by its forks too

    import dagster as dg

    from ..definitions import build_definitions
    from ..defs.assets import feature_asset_name
    from ..defs.jobs import FEATURES_JOB, RECORD_CACHE_JOB, SUMMARY_JOB, run_tags
    from ..defs.partitions import feature_partition_key, parse_feature_partition_key

    from ..defs.executors import execution_run_config, reconstructable_job
    from ..errors import ConfigError

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    instance = _common.dagster_instance()
    execution = execution_run_config(executor)  # raises ConfigError for celery without broker/backend
    if executor == "celery" and instance.is_ephemeral:
        raise ConfigError("--executor celery needs a persistent Dagster instance shared with the workers "
                          "(DAGSTER_HOME with deploy/dagster-postgres.yaml)")
    defs = build_definitions(settings, executor=executor)
    if executor != "in_process":
        progress = False  # the utterances are featurized in other processes
    if executor == "celery":  # dagster-celery registers its task again for every run of a process
        from celery.exceptions import DuplicateTaskNameWarning

        warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)

    def run(job_name: str, start: str, end: str, what: str, tags: dict[str, str]) -> bool:
        one = start == end  # a single partition: per-partition data version and check history
        tags = {"asr/cli": "materialize", "asr/executor": executor, **tags}
        if not one:
            tags.update({"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end})
        if executor == "in_process":
            job = defs.resolve_job_def(job_name)  # a named job, so the Runs page says what ran
            with contextlib.redirect_stderr(sys.stdout):  # Dagster's console log is progress, not a problem
                result = job.execute_in_process(
                    instance=instance, raise_on_error=False, run_config=_QUIET_LOGS,
                    partition_key=start if one else None, tags=tags,
                )
        else:
            if one:
                tags["dagster/partition"] = start
            with contextlib.redirect_stderr(sys.stdout):
                result = dg.execute_job(reconstructable_job(settings, job_name, executor), instance=instance,
                                        run_config={**_QUIET_LOGS, **execution}, tags=tags, raise_on_error=False)
        sys.stdout.flush()
        if _interrupted(result):  # Ctrl-C inside the run: stop here, as at any other moment (exit 130)
            raise KeyboardInterrupt
        if not result.success:
            print(f"asr-assets: run {result.run_id} ({what}) FAILED; see its log on stdout or in `dagster dev`",
                  file=sys.stderr)
        return result.success

    def feature_runs(busy: dict[str, list[int]], assets: str) -> bool:
        """Celery: one run per shard partition, ``concurrent_runs`` at once, each orchestrated by
        a process of a spawn pool (Dagster's run setup reconfigures ``logging`` and deadlocks when
        runs share a process on threads)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..defs.executors import settings_to_json

        jobs = [(feature_partition_key(split, shard), split, shard) for split in SPLITS for shard in busy.get(split, [])]
        text = settings_to_json(settings)
        workers = min(len(jobs), concurrent_runs or DEFAULT_CONCURRENT_RUNS)
        sys.stdout.flush()
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_execute_job_run, text, FEATURES_JOB, executor, key,
                                   {"asr/cli": "materialize", "asr/executor": executor,
                                    **run_tags(assets, split, shards=f"{shard:02d}")})
                       for key, split, shard in jobs]
            results = [f.result() for f in futures]
        for (key, _, _), (success, run_id) in zip(jobs, results):
            if not success:
                print(f"asr-assets: run {run_id} (features {key}) FAILED; see its log on stdout or in `dagster dev`",
                      file=sys.stderr)
        return all(success for success, _ in results)

    before = {split: _record_state(settings, split) for split in stale}
    ok = True
    if stale:  # one run: the first split's build writes every stale split in one pass over the manifests
        ok = run(RECORD_CACHE_JOB, stale[0], stale[-1], f"record_cache[{','.join(stale)}]",
                 run_tags("record_cache", ",".join(stale)))
    if ok and stale and no_records():  # only rebuilt splits can have changed the count
        _print_summary(settings)
        raise ManifestError(_no_records_message(settings))
    if ok:
        if busy is None:  # record caches were rebuilt: plan again
            busy = shards_with_work()
        assets = ",".join(feature_asset_name(name) for name in settings.frontends)
        with progress_bars(enabled=progress, file=stderr):  # the real stderr, not the redirected one
            if busy and executor == "celery":  # one run per shard partition, spread over the workers
                ok = feature_runs(busy, assets) and ok
            elif busy:  # runs over stretches of busy partitions (keys are shard-major: "07|train", "07|validation", ...)
                for first, last in feature_ranges(busy):  # boxes: shards lo..hi x splits
                    (split_lo, lo), (split_hi, hi) = parse_feature_partition_key(first), parse_feature_partition_key(last)
                    splits = SPLITS[SPLITS.index(split_lo):SPLITS.index(split_hi) + 1]
                    ok = run(FEATURES_JOB, first, last, f"features {first}...{last}",
                             run_tags(assets, ",".join(splits), shards=f"{lo:02d}-{hi:02d}")) and ok
        # a rebuilt split whose JSONL and report are those of before did not change for the summary
        rebuilt = [split for split in stale if before[split] is None or _record_state(settings, split) != before[split]]
        changed = [split for split in SPLITS if split in rebuilt or split in busy]
        if changed:  # one run over the range of splits that changed
            ok = run(SUMMARY_JOB, changed[0], changed[-1], "split_summary",
                     run_tags("split_summary", ",".join(changed))) and ok
    _print_summary(settings)
    return 0 if ok else 1


def _interrupted(result) -> bool:
    """Did Ctrl-C (SIGINT; Dagster maps SIGTERM to it while it runs) end this run? Inside a run
    Dagster turns the signal into a failed step (``DagsterExecutionInterruptedError``) and a run
    failure of reason ``UNEXPECTED_TERMINATION`` (the reason it gives interrupted runs only), and
    returns: no KeyboardInterrupt reaches the caller, which would otherwise go on with the next
    run and report a failure."""
    event = None if result.success else result.get_run_failure_event()
    return event is not None and getattr(event.job_failure_data.failure_reason, "name", None) == "UNEXPECTED_TERMINATION"


def _execute_job_run(settings_json: str, job_name: str, executor: str, partition_key: str,
                     tags: dict[str, str]) -> tuple[bool, str]:
    """One single-partition run of ``job_name`` with ``dagster.execute_job`` on the instance of
    ``DAGSTER_HOME``, in a pool process of :func:`materialize`; returns ``(success, run_id)``."""
    import contextlib
    import warnings

    import dagster as dg

    from ..defs.executors import execution_run_config, reconstructable_job, settings_from_json

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    if executor == "celery":  # dagster-celery registers its task again for every run of a process
        from celery.exceptions import DuplicateTaskNameWarning

        warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)
    with dg.DagsterInstance.get() as instance, contextlib.redirect_stderr(sys.stdout):
        result = dg.execute_job(reconstructable_job(settings_from_json(settings_json), job_name, executor),
                                instance=instance, run_config={**_QUIET_LOGS, **execution_run_config(executor)},
                                tags={**tags, "dagster/partition": partition_key}, raise_on_error=False)
    sys.stdout.flush()
    return result.success, result.run_id


def _no_records_message(settings: Settings) -> str:
    files = _manifest_files(settings)
    _, problems = _records_reports(settings)
    # file-level entries, not skipped TSV lines ("line N skipped: ...", see manifests.iter_manifest_rows)
    whole_file = [p for p in problems if not str(p.get("error", "")).startswith("line ")]
    broken = len({p.get("manifest") for p in whole_file})
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    whole = f"; {broken} with a file-level problem" if broken else ""
    if whole_file:  # the first one in full: e.g. the columns a manifest has and those expected
        first = whole_file[0]
        whole += f", first {first.get('manifest')}: {str(first.get('error', '')).strip()}"
    reports = settings.output_path / "reports" / f"records-{{{','.join(SPLITS)}}}.jsonl"
    return (f"no records to cache: the manifests gave 0 usable rows ({_common.plural(len(files), 'file')} read: "
            f"{shown}{whole}); reasons per file and row in {reports}")


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
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                if entry.get("utterance_id") is None:
                    problems.setdefault((entry.get("manifest"), entry.get("error")), entry)
                else:
                    rows[split] += 1
    return rows, list(problems.values())


def _print_summary(settings: Settings) -> None:
    from ..record_cache import RecordStore, record_cache_exists

    reports = settings.output_path / "reports"
    rejected, problems = _records_reports(settings)
    for split in SPLITS:
        path = settings.record_cache_path(split)
        if record_cache_exists(path):
            print(f"  {split:<10} {len(RecordStore(path)):>7} records, {rejected.get(split, 0)} manifest rows not cached")
    if problems:  # not counted above: their rows have no utterance id (skipped lines, unreadable files)
        print(f"  manifest problems: {len(problems)} (lines skipped or files not read; not counted in the rows above)")
    for entry in problems[:5]:
        print(f"  manifest problem: {entry.get('manifest')}: {entry.get('error')}")
    if len(problems) > 5:
        print(f"  ... and {len(problems) - 5} more manifest problems in {reports}/records-<split>.jsonl")
    failures = sum(sum(1 for _ in p.open(encoding="utf-8")) for p in reports.glob("*/*/shard_*.jsonl")) if reports.exists() else 0
    print(f"  feature failures: {failures} (reports under {reports})", flush=True)
