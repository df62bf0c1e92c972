"""Where a run's steps execute: ``in_process`` (the default), ``multiprocess`` or ``celery``.

Thin over Dagster's own executors (``dagster.in_process_executor``,
``dagster.multiprocess_executor``, ``dagster_celery.celery_executor``); this module only
chooses one, builds its run config, and makes jobs *reconstructable* so that another process
(a step subprocess, a Celery worker on another machine) can rebuild exactly the job the
launcher ran:

* :func:`executor_def` — the executor definition for a name (``executor=`` of
  :func:`asr_assets.definitions.build_definitions`).
* :func:`execution_run_config` — the ``execution:`` block of the run config, for Celery the
  broker and result backend *by environment variable name* (``ASR_ASSETS_CELERY_BROKER``,
  ``ASR_ASSETS_CELERY_BACKEND``: the run config shown in the UI never holds a password) and
  :data:`CELERY_CONFIG_SOURCE`.
* :func:`reconstructable_job` — ``dagster.build_reconstructable_job`` pointing at
  :func:`reconstruct_job` with the run's :class:`~asr_assets.settings.Settings` as JSON, so a
  worker builds the same assets (frontends, overrides, plugins) whatever its own ``ASR_ASSETS_*``.

Celery needs what every step process shares: the Dagster instance (PostgreSQL, see
``deploy/dagster-postgres.yaml``) and the output root (an ``s3://`` URL or one shared file
system). No value passes between steps in memory: the assets write the caches themselves and
return ``MaterializeResult``/``None``, so Dagster's default (persistent) IO manager suffices
and none is configured. Workers are ``dagster-celery worker start -A dagster_celery.app -y
deploy/celery-worker.yaml`` (whose ``config_source`` must equal :data:`CELERY_CONFIG_SOURCE`;
a test checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import dagster as dg

from asr_assets.errors import ConfigError
from asr_assets.settings import Settings

EXECUTORS = ("in_process", "multiprocess", "celery")
BROKER_ENV = "ASR_ASSETS_CELERY_BROKER"
BACKEND_ENV = "ASR_ASSETS_CELERY_BACKEND"

#: Celery settings of the launcher and (through ``deploy/celery-worker.yaml``) the workers.
#: ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only after it
#: ran, so the broker hands the task of a killed worker to another one. With Redis that happens
#: once the message is ``visibility_timeout`` seconds old (swept every
#: ``unacked_restore_interval`` s); the timeout must exceed the longest step (one shard run), or
#: a live task is handed out twice (harmless: the shard lease lock lets one compute, the other
#: finds the keys cached — wasted CPU only). ``worker_prefetch_multiplier: 1``: a worker holds one
#: task at a time, so a killed worker strands one task, not four.
CELERY_CONFIG_SOURCE: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_transport_options": {
        "visibility_timeout": 21600,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "max_retries": 3,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
}


def executor_def(name: str) -> dg.ExecutorDefinition:
    """Dagster's executor definition for ``name`` (one of :data:`EXECUTORS`).

    Raises:
        ConfigError: unknown name, or ``celery`` without the ``distributed`` extra installed.
    """
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "celery":
        try:
            from dagster_celery import celery_executor
        except ImportError as exc:
            raise ConfigError(f"--executor celery needs dagster-celery: pip install 'asr_assets[distributed]' ({exc})") from exc
        return celery_executor
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def execution_run_config(name: str, environ: Mapping[str, str] | None = None,
                         max_concurrent: int | None = None) -> dict:
    """The ``execution:`` run-config block of executor ``name``.

    ``celery``: ``broker``/``backend`` as ``{"env": ...}`` (resolved by the launcher and by each
    worker) plus :data:`CELERY_CONFIG_SOURCE`. ``multiprocess``: ``max_concurrent`` step
    processes (None: Dagster's default, the CPU count). ``in_process``: no config.

    Raises:
        ConfigError: ``celery`` and ``$ASR_ASSETS_CELERY_BROKER`` or ``$ASR_ASSETS_CELERY_BACKEND``
            is unset (e.g. ``redis://127.0.0.1:6379/0``).
    """
    env = os.environ if environ is None else environ
    if name == "celery":
        missing = [var for var in (BROKER_ENV, BACKEND_ENV) if not env.get(var)]
        if missing:
            raise ConfigError(f"--executor celery needs {' and '.join(missing)} (e.g. redis://127.0.0.1:6379/0), "
                              "the same broker and backend as the workers' deploy/celery-worker.yaml")
        return {"execution": {"config": {"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV},
                                         "config_source": CELERY_CONFIG_SOURCE}}}
    if name == "multiprocess":
        return {"execution": {"config": {"max_concurrent": max_concurrent}}} if max_concurrent else {}
    executor_def(name)  # raises for an unknown name
    return {}


def settings_to_json(settings: Settings) -> str:
    """``settings`` as JSON (paths as strings), read back by :func:`settings_from_json`."""
    return json.dumps(dataclasses.asdict(settings), default=str, sort_keys=True)


def settings_from_json(text: str) -> Settings:
    """The :class:`Settings` of :func:`settings_to_json` (lists back to tuples)."""
    values = json.loads(text)
    tuple_fields = {f.name for f in dataclasses.fields(Settings) if str(f.type).startswith("tuple")}
    return Settings(**{k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in values.items()})


def reconstruct_job(settings_json: str, job_name: str, executor: str) -> dg.JobDefinition:
    """The job ``job_name`` of the definitions for these settings and executor: what a step
    process or Celery worker calls (through :func:`reconstructable_job`) to rebuild the job."""
    from asr_assets.definitions import build_definitions

    return build_definitions(settings_from_json(settings_json), executor=executor).resolve_job_def(job_name)


def reconstructable_job(settings: Settings, job_name: str, executor: str):
    """A ``ReconstructableJob`` of ``job_name`` for ``dagster.execute_job``: its pointer is
    :func:`reconstruct_job` with the settings as JSON (every value JSON-serializable)."""
    return dg.build_reconstructable_job(
        "asr_assets.defs.executors", "reconstruct_job",
        reconstructable_kwargs={"settings_json": settings_to_json(settings), "job_name": job_name, "executor": executor},
    )
