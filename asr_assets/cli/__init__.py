"""``asr-assets`` command line.

    asr-assets [--debug] [-v|-vv] materialize [--manifests PATH]... [--output DIR] [--frontend NAME]... [--workers N]
                           [--plugin MODULE]... [--n-fft N --hop-length N ...] [--source-base DIR]
                           [--confine-audio [DIR]] [--no-ffmpeg-fallback] [--fail-fast]
    asr-assets frontends
    asr-assets compact [--output DIR] [--frontend NAME]... [--split SPLIT]...
    asr-assets export [--output DIR] --split SPLIT [--frontend NAME] --backend NAME --to PATH [--store DIR]
    asr-assets record-cache --dataset-source PATH... --record-cache-dir DIR [upstream flags]   (alias build-record-cache)
    asr-assets warm (--input F | --input-folder D... | --input-record-cache J) --cache-dir ROOT [upstream flags]

``materialize`` runs the whole graph through Dagster against the instance in ``DAGSTER_HOME``
(default ``./dagster_home``): one ``record_cache`` run over the splits that are not up to date,
feature runs over the shards with work of every enabled frontend, and a ``split_summary`` run
over the splits that changed (:mod:`asr_assets.cli.materialize`). Runs, lineage and metadata
then show in ``dagster dev``. Progress, including the Dagster run log, goes to stdout; stderr carries only
problems. ``record-cache`` and ``warm`` are upstream's ``asr-features`` command lines
(:mod:`asr_assets.cli.upstream`): same library, upstream-style log lines on stderr, Dagster
only when ``DAGSTER_HOME`` exists. Exit status: 0 when done (utterances that failed are in
``<output>/reports/``, or logged by ``warm``), 1 when a run failed (``warm --fail-fast`` hit a
bad row), 2 on an error the user can act on: a bad setting or flag (unknown frontend,
``--workers 0``, an ``--output`` that is a file or cannot be written, a missing manifest, a flag
value the library cannot honour), or manifests that give no record at all, 130 on Ctrl-C (also
inside a Dagster run, which Dagster then marks failed; no later run starts). Such an error, or
the interruption, is one line on stderr (``--debug`` adds the traceback).

Logging (:mod:`asr_assets.logs`) is configured here, once per call of :func:`main`: info by
default, ``-v`` debug, ``-vv`` trace, or ``ASR_ASSETS_LOG``.

Start-up imports nothing heavy: numpy, scipy, pyarrow and dagster are imported by the commands
that use them, so ``asr-assets --help`` answers at once. One module per command; the package
exposes each command's entry function under the command's name (``asr_assets.cli.materialize``
is the function, as it was when this package was one module).

Note: ``sample_data`` in this folder is a symlink to ``asr_assets/sample_data``, for code that
finds the bundled sample next to ``asr_assets.cli.__file__`` (as test_cli does).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import AsrAssetsError, ConfigError
from ..settings import Settings
from . import _common
from ._common import HELP_DEFAULTS, OVERRIDES, W2V_BERT_HELP_DEFAULTS
from .compact import run as compact
from .export import run as export
from .frontends import run as frontends
from .materialize import materialize
from .upstream import record_cache, warm

# The names of the single-module CLI, kept for callers and tests.
_OVERRIDES = OVERRIDES
_dagster_home = _common.dagster_home
_dagster_instance = _common.dagster_instance

__all__ = ["main", "materialize", "frontends", "compact", "export", "record_cache", "warm",
           "HELP_DEFAULTS", "W2V_BERT_HELP_DEFAULTS"]

_COMMANDS = "{materialize,frontends,compact,export,record-cache,warm}"


def _command_module(name: str):
    """The module ``asr_assets.cli.<name>`` (the package attribute of that name is its function)."""
    return importlib.import_module(f"{__name__}.{name}")


def _parser() -> argparse.ArgumentParser:
    modules = [_command_module(name) for name in ("materialize", "frontends", "compact", "export")]
    upstream = _command_module("upstream")
    parser = _common.Parser(prog="asr-assets", description="Record and feature caches for ASR training.")
    _common.add_global_flags(parser, sub=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar=_COMMANDS)
    commands = [module.add_parser(sub) for module in modules]
    commands += [upstream.add_record_cache_parser(sub), upstream.add_warm_parser(sub)]
    for command in commands:  # --debug and -v also after the command name
        _common.add_global_flags(command, sub=True)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Settings of ``materialize`` (see :func:`asr_assets.cli.materialize.settings_from_args`)."""
    from .materialize import settings_from_args

    try:
        return settings_from_args(args)
    except ValueError as exc:  # a bad value deep in a config (FeatureConfigError, ConfigError are ValueErrors too)
        if isinstance(exc, AsrAssetsError):
            raise
        raise ConfigError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``asr-assets``; returns the exit status (argparse errors exit 2 themselves)."""
    args = _parser().parse_args(argv)
    try:
        from ..logs import configure

        configure(verbosity=args.verbose or 0)
        if args.command == "materialize":
            return materialize(_settings(args), progress=args.progress, executor=args.executor,
                               concurrent_runs=args.concurrent_runs)
        run = {"frontends": frontends, "compact": compact, "export": export, "record-cache": record_cache,
               "build-record-cache": record_cache, "warm": warm}[args.command]
        return run(args)
    except (AsrAssetsError, KeyboardInterrupt) as exc:  # one line on stderr; --debug adds the traceback
        if args.debug:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: 128 + SIGINT, as a shell reports it
            print("asr-assets: interrupted; what was written is complete (every file appears atomically): run the "
                  "same command again to go on", file=sys.stderr, flush=True)
            return 130
        print(f"asr-assets: error: {_common.one_line(exc)}", file=sys.stderr, flush=True)
        return 2


def console_main() -> None:
    """The ``asr-assets`` console script and ``python -m asr_assets.cli``: :func:`main`, then exit
    with its status without tearing the interpreter down.

    Once ``main`` has returned, nothing is left to do but the exit handlers (``atexit``: logging
    shutdown, multiprocessing's clean-up of its fork server and temporary folder, temporary
    directories' finalizers), which run here as at any exit, and the flush of stdout and stderr.
    What a normal exit adds after that is freeing every object of the interpreter one by one:
    ~0.7 s after a ``materialize`` that ran Dagster (measured on the 1-hour corpus of
    ``benchmarks/end_to_end.py``), ~0.3 s after merely importing it. Every file this package
    writes is closed (and atomically renamed) before ``main`` returns, so skipping that loses
    nothing. When a non-daemon thread is still alive, the normal exit (which waits for it) is
    taken instead."""
    import atexit
    import threading

    status = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()  # what a normal exit runs; os._exit below then skips only the teardown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: what a normal exit would also lose
            pass
    os._exit(status)
