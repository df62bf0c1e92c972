"""Logging of asr_assets, like upstream's ``env_logger`` set-up: standard :mod:`logging`, loggers
named after the modules (``asr_assets.extraction`` ...), one extra level :data:`TRACE`.

Entry points:
    - :data:`TRACE` (5, below ``DEBUG``) and :func:`trace` — a line per utterance.
    - :func:`configure` — called once by the ``asr-assets`` command: level from ``-v``/``-vv``
      and ``ASR_ASSETS_LOG``, one handler on the ``asr_assets`` logger writing to stderr.
    - :func:`worker_config` / :func:`configure_worker` — the same levels in feature-worker
      processes (they are forked from a fork server, which never saw :func:`configure`).
    - :func:`parse_spec` — what ``ASR_ASSETS_LOG`` may hold.
    - :func:`native_stderr` — in a worker process, what C libraries print to fd 2 during one
      decode (libmpg123's warnings), to be logged with the file it belongs to.

Library modules only call ``logging.getLogger(__name__)`` and never configure anything, so an
application (or Dagster, through ``python_logs: managed_python_loggers: [asr_assets]`` in
``dagster.yaml``) sees the same records with its own handlers.

Levels, as upstream's ``RUST_LOG=asr_features=...``:

=========  ===================================================================================
info       default: start, inputs, progress every N rows, per-split and final summaries
debug      also decode / features per utterance (in the workers), batches, shard flushes, plans
trace      also one line per utterance and manifest row (ids, sources, frames, verdicts)
=========  ===================================================================================

``ASR_ASSETS_LOG`` is a level (``trace``, ``debug``, ``info``, ``warning``, ``error``, ``off``),
or a comma list of them and of ``logger=level`` items, e.g. ``info,asr_assets.extraction=trace``.
``asr_assets=debug`` (and upstream's ``asr_features=debug``) set the default level too. ``-v``
makes it at least debug, ``-vv`` at least trace (the more verbose of flag and variable wins).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Mapping

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

ROOT = "asr_assets"
ENV = "ASR_ASSETS_LOG"
LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 10}
_VERBOSITY = (logging.INFO, logging.DEBUG, TRACE)

#: What :func:`configure` set: ``{logger name: level}`` (None: not configured in this process).
_configured: dict[str, int] | None = None


def trace(logger: logging.Logger, msg: str, *args) -> None:
    """``logger.log(TRACE, msg, *args)``, formatting nothing when trace is off."""
    if logger.isEnabledFor(TRACE):
        logger._log(TRACE, msg, args)  # noqa: SLF001 - what Logger.debug does too


def parse_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """``"info,asr_assets.extraction=trace"`` -> ``(INFO, {"asr_assets.extraction": TRACE})``.

    Raises:
        ValueError: an unknown level or an empty logger name (the message names the item).
    """
    default: int | None = None
    per_logger: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, level = item.rpartition("=")
        name = name.strip()
        value = LEVELS.get(level.strip().lower())
        if value is None:
            raise ValueError(f"{ENV}: unknown level {level.strip()!r} in {spec!r}; "
                             f"use one of {', '.join(LEVELS)} (or logger=level items)")
        if "=" in item and not name:
            raise ValueError(f"{ENV}: empty logger name in {item!r}")
        if name and name not in (ROOT, "asr_features"):  # asr_features=debug: upstream's RUST_LOG spelling
            per_logger[name] = value
        else:
            default = value
    return default, per_logger


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, so ``redirect_stderr``
    (``asr-assets materialize`` sends a run's output to stdout) and pytest's capture apply."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.setStream; the stream is always sys.stderr
        pass


class _Formatter(logging.Formatter):
    """``[2026-04-26T10:00:00Z INFO  asr_assets.extraction] message`` (env_logger's layout)."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("[%(asctime)s %(levelname)-5s %(name)s] %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")


_HANDLER_MARK = "_asr_assets_handler"


def _apply(levels: Mapping[str, int]) -> None:
    for name in _configured or {}:  # per-logger levels of an earlier configure() in this process
        if name not in levels:
            logging.getLogger(name).setLevel(logging.NOTSET)
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def configure(verbosity: int = 0, environ: Mapping[str, str] | None = None) -> int:
    """Set up asr_assets logging for a command-line run; returns the ``asr_assets`` level.

    Safe to call again (the handler is replaced, not added twice). Records still propagate to
    the root logger, so handlers an embedding application installed there see them too.

    Args:
        verbosity: ``-v`` count: 0 info, 1 debug, 2 or more trace.
        environ: where ``ASR_ASSETS_LOG`` is read (default ``os.environ``).

    Raises:
        ConfigError: ``ASR_ASSETS_LOG`` does not parse (one-line message).
    """
    from .errors import ConfigError

    global _configured
    env = os.environ if environ is None else environ
    try:
        default, per_logger = parse_spec(env.get(ENV, ""))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    level = default if default is not None else logging.INFO
    if verbosity > 0:  # -v / -vv: at least debug / trace
        level = min(level, _VERBOSITY[min(verbosity, len(_VERBOSITY) - 1)])
    levels = {ROOT: level, **per_logger}
    _apply(levels)
    _configured = levels
    return level


def worker_config() -> dict[str, int] | None:
    """The levels :func:`configure` set in this process (None if it was not called), for
    :func:`configure_worker` in a worker process."""
    return dict(_configured) if _configured is not None else None


def configure_worker(levels: Mapping[str, int] | None) -> None:
    """In a worker process: the levels and stderr handler of the main process (no-op for None)."""
    global _configured
    if levels:
        _apply(levels)
        _configured = dict(levels)


class NativeStderr:
    """What C libraries wrote to file descriptor 2 inside :func:`native_stderr` (``text``: one
    line, whitespace collapsed, at most :data:`NATIVE_STDERR_MAX_CHARS`; ``""`` if nothing)."""

    text = ""


#: Characters of a library's stderr output kept per utterance or header (the rest is cut).
NATIVE_STDERR_MAX_CHARS = 500
_native_capture = None  # this process's capture file (an unlinked temporary file), once used


@contextlib.contextmanager
def native_stderr():
    """Capture what native code writes to file descriptor 2 while the block runs, e.g.
    libmpg123's ``Warning: Xing stream size off by more than 1%...`` from inside libsndfile,
    which names no file. The caller reports it with the utterance or path it belongs to.

    Only for single-threaded worker processes (feature and probe workers): file descriptor 2 is
    the whole process's, so output of other threads in the block would be captured too. Python
    code writing to ``sys.stderr`` in the block is flushed into the capture as well. Costs a
    few system calls (~10 µs); the file is reused and emptied each time."""
    global _native_capture
    if _native_capture is None:
        import tempfile

        _native_capture = tempfile.TemporaryFile()
    fd = _native_capture.fileno()
    result = NativeStderr()
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (started with 2>&-): nothing can be printed, nothing to capture
        yield result
        return
    os.dup2(fd, 2)
    try:
        yield result
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, min(size, 4 * NATIVE_STDERR_MAX_CHARS))
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            text = " ".join(data.decode("utf-8", errors="replace").split())
            result.text = text if len(text) <= NATIVE_STDERR_MAX_CHARS else text[:NATIVE_STDERR_MAX_CHARS - 1] + "…"


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):  # None, closed or broken: nothing buffered to move
        pass
