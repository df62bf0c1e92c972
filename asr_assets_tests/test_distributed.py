"""Beyond one machine, on one machine: Dagster on a real PostgreSQL, feature shards as Celery
tasks on two ``dagster-celery`` workers over a real Redis, manifests and caches on ``s3://``
(moto's server), every server on 127.0.0.1, started and stopped here (``servers.py``).

* Two ``asr-assets materialize`` processes at once against one Postgres instance.
* A backfill of one split (train, 46 utterances over its 64 shards) from ``s3://`` manifests to
  an ``s3://`` cache with ``--executor celery`` equals a local in-process run key for key and
  array for array, with every key written once; then one worker is SIGKILLed while a feature
  task runs on it, over a wiped feature cache: its task goes to the other worker, nothing is
  lost and nothing is written twice; a re-run has nothing to do.
* The worker config and the Kubernetes configs validate against the libraries' own schemas.

Missing server binaries fail with the package to install (README block 2 installs them).
Measured figures are written to ``$ASR_ASSETS_DISTRIBUTED_FIGURES`` (JSON) when set, and printed.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from . import servers
from .conftest import rows_per_key

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420  # one materialize subprocess, hard limit
LEASE_S = 15  # shard lease of a killed worker's lock (ASR_ASSETS_LOCK_LEASE_S)
VISIBILITY_S = 40  # Redis hands a killed worker's task out again after this


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg():
    with servers.postgres() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url():
    with servers.redis() as url:
        yield url


@pytest.fixture(scope="module")
def s3_endpoint():
    with servers.moto_s3() as (endpoint, counter):
        yield endpoint, counter


def _materialize(args: list[str], env: dict[str, str], log: Path, timeout_s: float = RUN_TIMEOUT_S):
    """``asr-assets materialize ARGS`` as a subprocess (stdout+stderr to ``log``); returns
    ``(returncode, wall seconds)``; killed (and the test failed) after ``timeout_s``."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "asr_assets.cli", "materialize", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"materialize {args} did not finish in {timeout_s} s; log tail:\n{log.read_text()[-3000:]}")
    return proc.returncode, time.perf_counter() - start


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASR_ASSETS_", "DAGSTER_", "AWS_"))}
    env["ASR_ASSETS_CACHE_DIR"] = str(tmp_path / "launcher-content-cache")
    return env


def _instance(home: Path, pg_env: dict[str, str], monkeypatch):
    import dagster as dg

    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    return dg.DagsterInstance.from_config(str(home))


# ----------------------------------------------------------------------------- Postgres


def test_two_processes_materialize_at_once_on_postgres(pg, test_data, tmp_path, monkeypatch):
    """Two ``asr-assets materialize`` processes (different outputs) share one Postgres instance at
    the same time; both succeed and all their runs and events are in Postgres."""
    import dagster as dg

    home = servers.dagster_home(tmp_path / "home", pg.env)
    env = {**_base_env(tmp_path), **pg.env, "DAGSTER_HOME": str(home)}
    procs = []
    for i in (1, 2):
        log = open(tmp_path / f"p{i}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-c", "import sys, time; t = time.time(); from asr_assets.cli import main; rc = main(sys.argv[1:]);"
             " print('WINDOW', t, time.time()); sys.exit(rc)", "materialize", "--manifests", str(test_data / "en_hf"),
             "--output", str(tmp_path / f"out{i}"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True), log))
    windows = []
    try:
        for proc, log in procs:
            proc.wait(timeout=RUN_TIMEOUT_S)
            log.close()
            text = Path(log.name).read_text()
            assert proc.returncode == 0, text[-3000:]
            windows.append([float(x) for x in text.split("WINDOW")[-1].split()[:2]])
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    (s1, e1), (s2, e2) = windows
    assert s1 < e2 and s2 < e1  # they did run at the same time
    instance = _instance(home, pg.env, monkeypatch)
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"asr/cli": "materialize"}))
    by_job = collections.Counter(r.job_name for r in runs)
    assert by_job["record_cache_job"] == 2  # one run over the 3 splits per process
    # the same boxes of busy shards in both processes (asr_assets.cli.materialize.feature_ranges)
    assert by_job["features_job"] >= 2 and by_job["features_job"] % 2 == 0 and by_job["summary_job"] == 2
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    records = instance.fetch_materializations(dg.AssetKey("record_cache"), limit=100).records
    paths = collections.Counter((r.partition_key, str(r.asset_materialization.metadata["path"].value).split("/record_cache/")[0])
                                for r in records)
    assert paths == {(split, str(tmp_path / f"out{i}")): 1 for split in ("train", "validation", "test") for i in (1, 2)}
    features = instance.fetch_materializations(dg.AssetKey("squeezeformer_features"), limit=1000).records
    rows = collections.Counter()
    for r in features:
        rows[str(r.asset_materialization.metadata["path"].value).split("/feature-cache/")[0]] += \
            r.asset_materialization.metadata["computed"].value
    assert rows[str(tmp_path / "out1")] == rows[str(tmp_path / "out2")] == 11  # en_hf: 11 utterances, each computed once per output


# ----------------------------------------------------------------------------- configs


def test_worker_config_matches_the_launcher_and_validates():
    from dagster._config import process_config, validate_config
    from dagster_celery.executor import celery_executor

    from asr_assets.defs.executors import CELERY_CONFIG_SOURCE, execution_run_config

    config = yaml.safe_load((REPO / "deploy" / "celery-worker.yaml").read_text())["execution"]["config"]
    schema = celery_executor.config_schema.config_type
    assert validate_config(schema, config).success
    assert config["config_source"] == CELERY_CONFIG_SOURCE
    launcher = execution_run_config("celery", {"ASR_ASSETS_CELERY_BROKER": "redis://x:1/0",
                                               "ASR_ASSETS_CELERY_BACKEND": "redis://x:1/1"})["execution"]["config"]
    assert launcher == config
    os.environ.setdefault("ASR_ASSETS_CELERY_BROKER", "redis://127.0.0.1:1/0")
    os.environ.setdefault("ASR_ASSETS_CELERY_BACKEND", "redis://127.0.0.1:1/1")
    processed = process_config(schema, config)
    assert processed.success and processed.value["broker"] == os.environ["ASR_ASSETS_CELERY_BROKER"]
    assert not validate_config(schema, {**config, "brokr": "x"}).success  # a typo is refused
    from asr_assets.errors import ConfigError

    with pytest.raises(ConfigError, match="ASR_ASSETS_CELERY_BROKER"):
        execution_run_config("celery", {})


def test_k8s_configs_validate_against_dagster_k8s():
    """``deploy/k8s``: the instance config (K8sRunLauncher + Postgres) and the run config
    (``k8s_job_executor``) pass Dagster's own config validation; the Helm values name the same
    image, namespace and Postgres database. No cluster is contacted."""
    from dagster._config import validate_config
    from dagster._core.storage.config import pg_config
    from dagster_k8s import K8sRunLauncher, k8s_job_executor

    instance = yaml.safe_load((REPO / "deploy" / "k8s" / "dagster-instance.yaml").read_text())
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert result.success, [e.message for e in result.errors]
    assert validate_config(pg_config(), instance["storage"]["postgres"]).success
    run_config = yaml.safe_load((REPO / "deploy" / "k8s" / "run-config.yaml").read_text())
    result = validate_config(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    assert result.success, [e.message for e in result.errors]
    bad = {**run_config["execution"]["config"], "max_concurent": 4}
    assert not validate_config(k8s_job_executor.config_schema.config_type, bad).success
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "asr_assets.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespace"] == launcher["config"]["job_namespace"]
    assert values["postgresql"]["postgresqlDatabase"] == instance["storage"]["postgres"]["postgres_db"]["db_name"]
    image = deployment["image"]
    assert f"{image['repository']}:{image['tag']}" == run_config["execution"]["config"]["job_image"]


# ----------------------------------------------------------------------------- Celery


def _corpus(test_data: Path, root: Path) -> Path:
    """formats + en_hf (46 utterances, all to train) and ``heldout`` (1 row of formats, the
    validation source)."""
    for name in ("formats", "en_hf"):
        shutil.copytree(test_data / name, root / name)
    lines = (test_data / "formats" / "manifest.tsv").read_text(encoding="utf-8").splitlines()
    cols = lines[0].split("\t")
    row = lines[1].split("\t")
    row[cols.index("id")] = "heldout_" + row[cols.index("id")]
    row[cols.index("path")] = "../formats/" + row[cols.index("path")]
    (root / "heldout").mkdir()
    (root / "heldout" / "manifest.tsv").write_text(lines[0] + "\n" + "\t".join(row) + "\n", encoding="utf-8")
    return root


def _upload_tree(local: Path, url: str) -> None:
    from asr_assets import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes())


def _compare_train(local_out: Path, remote_out: str, tmp: Path) -> dict:
    """Train of the s3 cache vs the local one: same records, same keys per shard, identical
    arrays; returns ``{"keys", "shards_with_keys", "rows_per_key"}``."""
    from asr_assets import storage
    from asr_assets.feature_cache import ShardedParquetFeatureCache
    from asr_assets.record_cache import RecordStore

    local_store = RecordStore(local_out / "record_cache" / "train.jsonl")
    remote_store = RecordStore(f"{remote_out}/record_cache/train.jsonl")
    uids = [r["utterance_id"] for r in local_store]
    assert [r["utterance_id"] for r in remote_store] == uids
    local_cache = ShardedParquetFeatureCache(local_out / "feature-cache" / "train")
    remote_cache = ShardedParquetFeatureCache(f"{remote_out}/feature-cache/train")
    fhash = local_cache._frontend_hash("squeezeformer")
    shards_with_keys = 0
    for shard in range(64):
        keys = local_cache.keys(shard, fhash)
        assert remote_cache.keys(shard, fhash) == keys, shard
        shards_with_keys += bool(keys)
    present = 0
    for want, got in zip(local_cache.load_many(uids), remote_cache.load_many(uids)):
        assert (want is None) == (got is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)
            present += 1
    if tmp.exists():
        shutil.rmtree(tmp)
    storage.download_tree(f"{remote_out}/feature-cache/train", tmp)
    rows = rows_per_key(tmp)
    return {"keys": present, "shards_with_keys": shards_with_keys, "rows_per_key": rows}


def _task_ids(log: str, state: str) -> set[str]:
    """Celery task ids a worker log shows as ``received`` or ``succeeded``."""
    import re

    return set(re.findall(r"Task execute_plan\[([0-9a-f-]+)\] " + state, log))


def _feature_runs(instance, since: float) -> list:
    import dagster as dg

    return [r for r in instance.get_run_records(filters=dg.RunsFilter(job_name="features_job", tags={"asr/split": "train"}))
            if r.create_timestamp.timestamp() >= since]


def _step_workers(instance, run_id: str) -> list[tuple[str, str]]:
    """``[(step key, worker)]`` of every "Executing steps ... in celery worker" event of a run."""
    import dagster as dg

    found = []
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
        event = record.event_log_entry.dagster_event
        metadata = event.event_specific_data.metadata if event.event_specific_data else {}
        if "Celery worker" in metadata:
            found.append((event.step_key, str(metadata["Celery worker"].value).split("@")[0]))
    return found


def _step_seconds(instance, run_id: str, step_key: str) -> float:
    import dagster as dg

    times = {}
    for kind in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS):
        recs = [r for r in instance.get_records_for_run(run_id, of_type=kind).records
                if r.event_log_entry.step_key == step_key]
        times[kind] = recs[-1].event_log_entry.timestamp if recs else None
    start, end = times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]
    return end - start if start and end else float("nan")


def test_celery_backfill_of_one_split_equals_a_local_run_and_survives_a_killed_worker(
        pg, redis_url, s3_endpoint, test_data, tmp_path, monkeypatch):
    import dagster as dg

    from asr_assets import storage

    endpoint, counter = s3_endpoint
    s3 = servers.s3_env(endpoint)
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ASR_ASSETS_CACHE_DIR", str(tmp_path / "test-content-cache"))
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    bucket = f"s3://dist{time.time_ns()}"
    fs, _ = storage.filesystem(bucket)
    fs.mkdir(bucket[5:])
    corpus = _corpus(test_data, tmp_path / "manifests")
    _upload_tree(corpus, f"{bucket}/manifests")

    # local reference: in-process executor, local paths, its own SQLite DAGSTER_HOME, both cores
    local_out = tmp_path / "local"
    local_env = {**_base_env(tmp_path), "DAGSTER_HOME": str(tmp_path / "local_home")}
    rc, local_wall = _materialize(["--manifests", str(corpus / "formats"), "--manifests", str(corpus / "en_hf"),
                                   "--validation-manifests", str(corpus / "heldout"), "--output", str(local_out),
                                   "--workers", "2"], local_env, tmp_path / "local.log")
    assert rc == 0, (tmp_path / "local.log").read_text()[-3000:]
    local_instance = dg.DagsterInstance.from_config(str(tmp_path / "local_home"))
    local_features = [r for r in local_instance.get_run_records(filters=dg.RunsFilter(job_name="features_job"))]
    assert local_features  # one per box of busy shards (asr_assets.cli.materialize.feature_ranges)
    local_feature_wall = sum(r.end_time - r.start_time for r in local_features)

    home = servers.dagster_home(tmp_path / "home", pg.env)
    shared = {**pg.env, **s3, "DAGSTER_HOME": str(home), "ASR_ASSETS_CELERY_BROKER": f"{redis_url}/0",
              "ASR_ASSETS_CELERY_BACKEND": f"{redis_url}/1", "ASR_ASSETS_LOCK_LEASE_S": str(LEASE_S)}
    env = {**_base_env(tmp_path), **shared}
    out = f"{bucket}/out"
    args = ["--manifests", f"{bucket}/manifests/formats", "--manifests", f"{bucket}/manifests/en_hf",
            "--validation-manifests", f"{bucket}/manifests/heldout", "--output", out, "--workers", "1",
            "--executor", "celery", "--concurrent-runs", "4"]
    config = servers.worker_config(tmp_path / "celery-worker.yaml", visibility_timeout_s=VISIBILITY_S, restore_interval_s=2)
    instance = _instance(home, pg.env, monkeypatch)
    with servers.celery_workers(2, config, shared, tmp_path / "workers") as workers:
        # 1. the whole graph through Celery, s3 -> s3
        t0 = time.time()
        requests_before = len(counter.requests)
        rc, celery_wall = _materialize(args, env, tmp_path / "celery1.log")
        assert rc == 0, (tmp_path / "celery1.log").read_text()[-5000:]
        requests = counter.requests[requests_before:]
        first = _compare_train(local_out, out, tmp_path / "copy1")
        assert first["keys"] == 46 and first["shards_with_keys"] >= 25
        assert all(n == 1 for n in first["rows_per_key"].values())  # every key written once
        assert len(first["rows_per_key"]) == 46
        runs = _feature_runs(instance, t0)
        assert len(runs) == first["shards_with_keys"]  # one run per train shard with work
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        by_worker: dict[str, list[float]] = collections.defaultdict(list)
        audio_by_worker: dict[str, float] = collections.defaultdict(float)
        overhead, step_s, audio_s = [], [], 0.0
        for r in runs:
            steps = dict(_step_workers(instance, r.dagster_run.run_id))
            assert set(steps) == {"squeezeformer_features", "squeezeformer_features_features_complete_and_finite"}
            seconds = _step_seconds(instance, r.dagster_run.run_id, "squeezeformer_features")
            by_worker[steps["squeezeformer_features"]].append(seconds)
            step_s.append(seconds)
            overhead.append((r.end_time - r.start_time) - seconds)
            [m] = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("squeezeformer_features"), asset_partitions=[r.dagster_run.tags["dagster/partition"]]),
                limit=1).records
            audio_s += m.asset_materialization.metadata["audio_seconds"].value
            audio_by_worker[steps["squeezeformer_features"]] += m.asset_materialization.metadata["audio_seconds"].value
        assert set(by_worker) == {"w1", "w2"}  # both workers featurized shards
        phase = max(r.end_time for r in runs) - min(r.start_time for r in runs)

        # 2. wipe train's features, run again and SIGKILL w1 while a feature task runs on it
        fs.rm(f"{out}/feature-cache/train".removeprefix("s3://"), recursive=True)
        fs.invalidate_cache()
        t1 = time.time()
        log = open(tmp_path / "celery2.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "asr_assets.cli", "materialize", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        killed_at = None
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            w1 = workers[0]
            while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
                done = sum(1 for r in _feature_runs(instance, t1) if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS)
                text = w1.log.read_text(errors="replace")
                busy = text.rfind("Task execute_plan[") > max(text.rfind(" succeeded in "), text.rfind(" raised "))
                started = [r for r in _feature_runs(instance, t1) if r.dagster_run.status == dg.DagsterRunStatus.STARTED]
                if done >= 3 and busy and started:
                    w1.kill()
                    killed_at = time.time()
                time.sleep(0.1)
            assert killed_at is not None, "never saw a feature task running on w1"
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            log.close()
        rc2 = proc.returncode
        recovery_wall = time.time() - t1
        # the task w1 held when it died (received, never finished there) was run by w2
        w1_log, w2_log = (w.log.read_text(errors="replace") for w in workers)
        lost = {t for t in _task_ids(w1_log, "received") if t not in _task_ids(w1_log, "succeeded")}
        redelivered = sorted(lost & _task_ids(w2_log, "succeeded"))
        # 3. re-run: nothing left to do if nothing was lost
        rc3, _ = _materialize(args, env, tmp_path / "celery3.log")
        third_log = (tmp_path / "celery3.log").read_text()
    assert rc2 == 0, (tmp_path / "celery2.log").read_text()[-5000:]
    assert len(redelivered) == 1, lost  # the killed worker's one task (prefetch 1) ran again, on w2
    assert rc3 == 0 and "up to date" in third_log, third_log[-3000:]
    second = _compare_train(local_out, out, tmp_path / "copy2")
    assert second["keys"] == 46 and len(second["rows_per_key"]) == 46
    duplicated = sum(n - 1 for n in second["rows_per_key"].values())
    assert duplicated == 0, second["rows_per_key"]  # parts are committed per shard in one PUT: none twice

    xrt_workers = {w: round(audio_by_worker[w] / sum(s), 1) for w, s in by_worker.items()}
    figures = {
        "utterances": 46, "audio_seconds": round(audio_s, 1), "train_shards_with_work": len(runs),
        "in_process_cli_wall_s": round(local_wall, 1), "in_process_feature_run_wall_s": round(local_feature_wall, 1),
        "in_process_xrt": round(audio_s / local_feature_wall, 1),
        "celery_cli_wall_s": round(celery_wall, 1), "celery_feature_phase_wall_s": round(phase, 1),
        "celery_xrt_2_workers": round(audio_s / phase, 1), "celery_xrt_per_worker": round(audio_s / phase / 2, 1),
        "feature_step_s_median": round(statistics.median(step_s), 2),
        "dagster_overhead_per_partition_s_median": round(statistics.median(overhead), 2),
        "dagster_overhead_per_partition_s_mean": round(statistics.mean(overhead), 2),
        "shards_per_worker": {w: len(s) for w, s in by_worker.items()},
        "xrt_per_worker_feature_step_time": xrt_workers,
        "s3_requests_celery_run": len(requests),
        "s3_requests_by_method": dict(collections.Counter(m for m, _, _ in requests)),
        "kill_run_wall_s": round(recovery_wall, 1), "killed_after_s": round(killed_at - t1, 1),
        "kill_run_rc": rc2, "redelivered_tasks": len(redelivered),
        "postgres_events_per_feature_run": round(statistics.mean(
            len(instance.get_records_for_run(r.dagster_run.run_id, limit=10000).records) for r in runs), 1),
    }
    print("distributed figures:", json.dumps(figures, sort_keys=True))
    if os.environ.get("ASR_ASSETS_DISTRIBUTED_FIGURES"):
        Path(os.environ["ASR_ASSETS_DISTRIBUTED_FIGURES"]).write_text(json.dumps(figures, indent=2, sort_keys=True))
    assert celery_wall > 0 and audio_s > 300  # formats is 35 x 11 s of JFK


# ----------------------------------------------------------------------------- executors (no servers)


def test_executor_configs_and_reconstructable_jobs():
    from asr_assets.defs.executors import (execution_run_config, executor_def, reconstruct_job, reconstructable_job,
                                           settings_from_json, settings_to_json)
    from asr_assets.errors import ConfigError
    from asr_assets.settings import Settings

    settings = Settings(manifests=("s3://b/m/cv", "/data/x"), output="s3://b/out", workers=3,
                        frontend_overrides={"squeezeformer": {"n_mels": 64}}, record_options={"seed": 7})
    assert settings_from_json(settings_to_json(settings)) == settings
    assert execution_run_config("in_process") == {}
    assert execution_run_config("multiprocess", max_concurrent=2) == {"execution": {"config": {"max_concurrent": 2}}}
    assert executor_def("multiprocess").name == "multiprocess" and executor_def("celery").name == "celery"
    with pytest.raises(ConfigError, match="unknown executor"):
        executor_def("dask")
    job = reconstruct_job(settings_to_json(settings), "features_job", "celery")
    assert job.name == "features_job" and job.executor_def.name == "celery"
    # the worker's job has the overridden frontend (64 mels) whatever its own environment says
    import dagster as dg

    key = dg.AssetKey("squeezeformer_features")
    [features] = [a for a in job.asset_layer.asset_graph.assets_defs if key in a.keys]
    assert features.code_versions_by_key[key].endswith(settings.frontend("squeezeformer").frontend_hash())
    recon = reconstructable_job(settings, "features_job", "multiprocess")
    assert recon.get_definition().name == "features_job"
    assert recon.get_python_origin().get_id()  # serializable pointer for step processes / workers


def test_celery_executor_without_broker_is_a_clear_error(test_data, tmp_path, capsys, monkeypatch):
    from asr_assets.cli import main

    monkeypatch.delenv("ASR_ASSETS_CELERY_BROKER", raising=False)
    monkeypatch.delenv("ASR_ASSETS_CELERY_BACKEND", raising=False)
    assert main(["materialize", "--manifests", str(test_data / "en_hf"), "--output", str(tmp_path / "o"),
                 "--executor", "celery"]) == 2
    assert "ASR_ASSETS_CELERY_BROKER and ASR_ASSETS_CELERY_BACKEND" in capsys.readouterr().err


def test_multiprocess_executor_equals_in_process(test_data, tmp_path):
    """``--executor multiprocess`` (a process per step, the job rebuilt from its settings)
    writes the same record cache and features as the default in-process run."""
    from asr_assets.feature_cache import ShardedParquetFeatureCache
    from asr_assets.record_cache import RecordStore

    outs = {}
    for executor in ("in_process", "multiprocess"):
        env = {**_base_env(tmp_path), "DAGSTER_HOME": str(tmp_path / f"home_{executor}")}
        rc, _ = _materialize(["--manifests", str(test_data / "en_hf"), "--output", str(tmp_path / executor),
                              "--workers", "1", "--executor", executor], env, tmp_path / f"{executor}.log")
        assert rc == 0, (tmp_path / f"{executor}.log").read_text()[-3000:]
        outs[executor] = tmp_path / executor
    import dagster as dg

    runs = dg.DagsterInstance.from_config(str(tmp_path / "home_multiprocess")).get_runs()
    assert {r.tags.get("asr/executor") for r in runs} == {"multiprocess"}
    by_job = collections.Counter(r.job_name for r in runs)  # features: one run per box of busy shards
    assert by_job["record_cache_job"] == 1 and by_job["summary_job"] == 1 and by_job["features_job"] >= 1
    compared = 0
    for split in ("train", "validation", "test"):
        a = RecordStore(outs["in_process"] / "record_cache" / f"{split}.jsonl")
        b = RecordStore(outs["multiprocess"] / "record_cache" / f"{split}.jsonl")
        uids = [r["utterance_id"] for r in a]
        assert [r["utterance_id"] for r in b] == uids
        ca = ShardedParquetFeatureCache(outs["in_process"] / "feature-cache" / split)
        cb = ShardedParquetFeatureCache(outs["multiprocess"] / "feature-cache" / split)
        for x, y in zip(ca.load_many(uids), cb.load_many(uids)):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
                compared += 1
    assert compared == 11
