"""The batched SQLite event log (:mod:`asr_assets.defs.event_storage`) stores what Dagster's own
SQLite storage stores, in fewer transactions.

A range run over 12 partitions of a partitioned asset (with a check) runs once on an instance
with the default storage and once on the instance ``asr-assets`` opens; the second home is then
read back with Dagster's *default* storage class (as ``dagster dev`` does) and must show the
same: the same event types per run, every partition materialized by that run, the planned
events, the asset's latest materialization and the check's evaluation. The batch path must
have been taken (planned and materialization events of 12 partitions in two batch writes).
"""

from collections import Counter

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from asr_assets.cli import _common
from asr_assets.defs import event_storage

PARTS = dg.StaticPartitionsDefinition([f"p{i:02d}" for i in range(12)])


@dg.asset(partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run())
def numbers(context: dg.AssetExecutionContext) -> None:
    for key in context.partition_keys:
        context.add_asset_metadata({"square": int(key[1:]) ** 2}, partition_key=key)


@dg.asset_check(asset=numbers)
def numbers_ok() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


JOB = dg.define_asset_job("numbers_job", selection=dg.AssetSelection.assets(numbers))
DEFS = dg.Definitions(assets=[numbers], asset_checks=[numbers_ok], jobs=[JOB])


def _range_run(instance: dg.DagsterInstance) -> str:
    result = DEFS.resolve_job_def("numbers_job").execute_in_process(
        instance=instance, tags={"dagster/asset_partition_range_start": "p00",
                                 "dagster/asset_partition_range_end": "p11"})
    assert result.success
    return result.run_id


def _what_it_shows(instance: dg.DagsterInstance, run_id: str) -> dict:
    key = numbers.key
    materialized = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100).records
    planned = instance.event_log_storage.get_event_records(
        dg.EventRecordsFilter(dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED, asset_key=key))
    latest = instance.get_latest_materialization_event(key)
    evaluation = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(key, "numbers_ok")])[dg.AssetCheckKey(key, "numbers_ok")]
    return {
        "event_types": Counter(e.dagster_event_type for e in instance.all_logs(run_id) if e.is_dagster_event),
        "materialized": sorted((r.partition_key, r.run_id == run_id,
                                r.asset_materialization.metadata["square"].value) for r in materialized),
        "materialized_partitions": sorted(instance.get_materialized_partitions(key)),
        "planned_runs": sorted({r.run_id == run_id for r in planned}),
        "planned": len(planned),
        "latest": (latest.run_id == run_id, latest.asset_materialization.partition),
        "check": (evaluation.run_id == run_id, evaluation.status.value),
    }


def test_batched_storage_shows_what_the_default_storage_shows(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    default_home, batched_home = tmp_path / "default", tmp_path / "batched"
    for home in (default_home, batched_home):
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    batches = []
    original = event_storage.BatchedSqliteEventLogStorage.store_event_batch
    monkeypatch.setattr(event_storage.BatchedSqliteEventLogStorage, "store_event_batch",
                        lambda self, events: (batches.append(len(events)), original(self, events))[1])

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(default_home))) as instance:
        default_run = _range_run(instance)
        expected = _what_it_shows(instance, default_run)

    batched = _common._instance_with_batched_events(str(batched_home))
    assert isinstance(batched.event_log_storage, event_storage.BatchedSqliteEventLogStorage)
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "1000")  # _instance_with_batched_events set it; monkeypatch restores
    with batched:
        batched_run = _range_run(batched)
    # 12 planned materializations + the planned check evaluation, then 12 materializations
    assert sorted(batches) == [12, 13]

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(batched_home))) as reader:
        assert type(reader.event_log_storage).__name__ == "SqliteEventLogStorage"
        shown = _what_it_shows(reader, batched_run)
    assert shown == expected
    assert shown["materialized"] == [(f"p{i:02d}", True, i * i) for i in range(12)]
    assert shown["planned"] == 12 and shown["latest"][0] and shown["check"] == (True, "SUCCEEDED")


@pytest.mark.parametrize("config", [
    "storage:\n  sqlite:\n    base_dir: {home}/elsewhere\n",
    "event_log_storage:\n  module: dagster._core.storage.event_log\n  class: SqliteEventLogStorage\n"
    "  config:\n    base_dir: {home}/events\n",
])
def test_a_configured_storage_is_used_as_configured(tmp_path, config):
    (tmp_path / "dagster.yaml").write_text(config.format(home=tmp_path))
    assert _common._instance_with_batched_events(str(tmp_path)) is None
