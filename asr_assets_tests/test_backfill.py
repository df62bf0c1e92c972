"""The deployed Dagster path: ``dagster dev`` + daemon, a split backfill launched like the UI does, the sensor CLI.

Scope (what the in-process tests in ``test_graph.py`` cannot cover):

* ``dagster dev -w workspace.yaml`` (webserver, daemon, code server) starts on a throw-away
  instance (``DAGSTER_HOME`` in ``tmp_path`` with a copy of the repo's ``dagster_home/dagster.yaml``)
  and the bundled sample manifests, and is stopped with SIGINT (process group killed as a fallback).
* A backfill of ``record_cache[validation]`` plus all 64 ``squeezeformer_features`` partitions of
  validation is launched with one GraphQL ``launchPartitionBackfill`` in the form the UI's
  "Materialize selected" dialog sends for a selection of both assets (``assetSelection`` +
  ``partitionNames`` of the anchor asset, downstream partitions follow the partition mapping).
* The backfill daemon completes it honouring the backfill policies (one run for the split's
  record cache, one run for its 64 feature shards), every validation feature partition is
  materialized in the instance, and the features are on disk under
  ``$ASR_ASSETS_OUTPUT/feature-cache/validation/feature_shards``.
* ``dagster sensor list -w workspace.yaml`` shows both sensors with their default status.

Not covered here: the sensors' tick logic and automation conditions (unit-tested in-process), real
speech corpora, other splits. Takes about 1.5 min: the backfill daemon ticks every 30 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from asr_assets import RecordStore, ShardedParquetFeatureCache
from asr_assets.defs.partitions import NUM_SHARDS, feature_partition_key

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = REPO / "workspace.yaml"
LAUNCHER = Path(__file__).resolve().with_name("_dagster_dev.py")
FEATURES = "squeezeformer_features"
SPLIT = "validation"

STARTUP_TIMEOUT_S = 120
BACKFILL_TIMEOUT_S = 300
TERMINAL_BACKFILL_STATUSES = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}

LOCATION_QUERY = """
{ workspaceOrError { __typename
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } } } }
    ... on PythonError { message } } }
"""

ASSET_KEYS_QUERY = "{ assetNodes { assetKey { path } } }"

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
  }
}
"""

BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      error { message stack }
      assetBackfillData {
        assetBackfillStatuses {
          __typename
          ... on AssetPartitionsStatusCounts {
            assetKey { path } numPartitionsTargeted numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed
          }
        }
      }
      runs { runId status tags { key value } }
    }
    ... on PythonError { message }
    ... on BackfillNotFoundError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DagsterDev:
    """A running ``dagster dev``: its GraphQL endpoint and its log."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}/graphql"
        self.log_path = log_path

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- tail of dagster dev log ({self.log_path}) ---\n{self.log_tail()}", pytrace=False)

    @contextmanager
    def explain_failures(self):
        """Any assertion error inside gets the tail of the dagster dev log appended."""
        try:
            yield
        except AssertionError as exc:
            self.fail(f"{exc}")

    def gql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        if payload.get("errors"):
            self.fail(f"GraphQL errors: {json.dumps(payload['errors'], indent=1)[:3000]}")
        return payload["data"]

    def wait_until_ready(self) -> None:
        """The webserver answers and the ``asr_assets`` location is loaded with its assets."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"dagster dev exited with code {self.proc.returncode} during startup")
            try:
                if self.gql("{ version }", timeout=5).get("version"):
                    entries = self.gql(LOCATION_QUERY, timeout=10)["workspaceOrError"].get("locationEntries") or []
                    by_name = {e["name"]: e for e in entries}
                    entry = by_name.get("asr_assets")
                    last = f"location entries: {entries}"
                    if entry and entry["loadStatus"] == "LOADED":
                        loaded = entry["locationOrLoadError"] or {}
                        if loaded.get("__typename") == "PythonError":
                            self.fail(f"code location asr_assets failed to load: {loaded.get('message')}")
                        keys = {"/".join(n["assetKey"]["path"]) for n in self.gql(ASSET_KEYS_QUERY)["assetNodes"]}
                        if {"record_cache", FEATURES} <= keys:
                            return
                        last = f"asset keys so far: {sorted(keys)}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = repr(exc)
            time.sleep(1)
        self.fail(f"dagster dev not ready after {STARTUP_TIMEOUT_S} s ({last})")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (clean shutdown of webserver, daemon, code server), then the process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
    # Whatever is left in the session (a run worker, a code server) goes too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def instance_env(tmp_path, monkeypatch) -> dict:
    """Temp DAGSTER_HOME (absolute, the repo's dagster.yaml), output in tmp_path, bundled sample manifests."""
    home = (tmp_path / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ASR_ASSETS_OUTPUT", str((tmp_path / "artifacts").resolve()))
    monkeypatch.setenv("ASR_ASSETS_WORKERS", "2")
    monkeypatch.delenv("ASR_ASSETS_MANIFESTS", raising=False)  # default: the bundled sample
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    return dict(os.environ)


@pytest.fixture
def dagster_dev(instance_env, tmp_path):
    port = _free_port()
    log_path = tmp_path / "dagster_dev.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=instance_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: killable as a whole
        )
    dev = DagsterDev(proc, port, log_path)
    try:
        dev.wait_until_ready()
        yield dev
    finally:
        _stop(proc)


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["tags"]}


def test_ui_backfill_of_one_split_materializes_every_feature_partition(dagster_dev, instance_env):
    dev = dagster_dev
    # What the UI sends for "Materialize selected" on record_cache + squeezeformer_features with
    # partition "validation" of the anchor asset record_cache: all downstream partitions follow.
    launched = dev.gql(LAUNCH_BACKFILL, {"params": {
        "assetSelection": [{"path": ["record_cache"]}, {"path": [FEATURES]}],
        "partitionNames": [SPLIT],
        "fromFailure": False,
        "title": f"{SPLIT} split",
        "tags": [{"key": "asr/test", "value": "test_backfill"}],
    }})["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        dev.fail(f"launchPartitionBackfill failed: {json.dumps(launched, indent=1)}")
    backfill_id = launched["backfillId"]

    start = time.monotonic()
    backfill: dict = {}
    while time.monotonic() - start < BACKFILL_TIMEOUT_S:
        result = dev.gql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if result["__typename"] != "PartitionBackfill":
            dev.fail(f"partitionBackfillOrError({backfill_id}): {result}")
        backfill = result
        if backfill["status"] in TERMINAL_BACKFILL_STATUSES:
            break
        if dev.proc.poll() is not None:
            dev.fail(f"dagster dev exited with code {dev.proc.returncode} during the backfill")
        time.sleep(2)
    else:
        dev.fail(f"backfill {backfill_id} not finished after {BACKFILL_TIMEOUT_S} s: {json.dumps(backfill, indent=1)[:3000]}")
    print(f"backfill {backfill_id}: {backfill['status']} after {time.monotonic() - start:.0f} s")

    expected_keys = {feature_partition_key(SPLIT, shard) for shard in range(NUM_SHARDS)}
    with dev.explain_failures():
        assert backfill["status"] == "COMPLETED_SUCCESS", json.dumps(backfill, indent=1)[:3000]
        counts = {"/".join(s["assetKey"]["path"]): s for s in backfill["assetBackfillData"]["assetBackfillStatuses"]}
        assert counts["record_cache"]["numPartitionsTargeted"] == counts["record_cache"]["numPartitionsMaterialized"] == 1
        assert counts[FEATURES]["numPartitionsTargeted"] == counts[FEATURES]["numPartitionsMaterialized"] == NUM_SHARDS
        assert counts[FEATURES]["numPartitionsFailed"] == 0

        # Backfill policies: record_cache one run per split; features multi_run(64) -> the 64
        # shards of the split in one run.
        runs = backfill["runs"]
        assert all(r["status"] == "SUCCESS" for r in runs), runs
        cache_runs = [r for r in runs if _tags(r).get("dagster/partition") == SPLIT]
        feature_runs = [r for r in runs if "dagster/asset_partition_range_start" in _tags(r)]
        assert len(runs) == 2 and len(cache_runs) == 1 and len(feature_runs) == 1, [_tags(r) for r in runs]
        feature_tags = _tags(feature_runs[0])
        assert (feature_tags["dagster/asset_partition_range_start"], feature_tags["dagster/asset_partition_range_end"]) == (
            feature_partition_key(SPLIT, 0), feature_partition_key(SPLIT, NUM_SHARDS - 1))
        assert feature_tags.get("asr/test") == "test_backfill"

        # The instance (same DAGSTER_HOME as the daemon) has every validation partition, nothing else.
        with dg.DagsterInstance.get() as instance:
            assert instance.get_materialized_partitions(dg.AssetKey("record_cache")) == {SPLIT}
            assert instance.get_materialized_partitions(dg.AssetKey(FEATURES)) == expected_keys

        # And the files: every record of the split has finite 80-dim features in the shard layout.
        output = Path(instance_env["ASR_ASSETS_OUTPUT"])
        store = RecordStore(output / "record_cache" / f"{SPLIT}.jsonl")
        assert len(store) >= 1, "the bundled sample has validation utterances"
        shards_root = output / "feature-cache" / SPLIT / "feature_shards"
        assert shards_root.is_dir(), f"{shards_root} missing"
        assert list(shards_root.glob("features_*/part_*.parquet")), f"no feature parts under {shards_root}"
        cache = ShardedParquetFeatureCache(output / "feature-cache" / SPLIT)
        try:
            for record in store:
                feats = cache.load(record["utterance_id"], frontend="squeezeformer")
                assert feats is not None, f"no features for {record['utterance_id']}"
                assert feats.ndim == 2 and feats.shape[0] > 0 and feats.shape[1] == 80, feats.shape
        finally:
            cache.close()


def test_sensor_list_shows_both_sensors(instance_env):
    """``dagster sensor list -w workspace.yaml`` loads the location and lists the sensors with their defaults."""
    Path(instance_env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "sensor", "list", "-w", str(WORKSPACE)],
        cwd=REPO, env=instance_env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert re.search(r"Sensor: manifest_sensor \[STOPPED\]", proc.stdout), proc.stdout
    assert re.search(r"Sensor: feature_automation_sensor \[RUNNING\]", proc.stdout), proc.stdout
