"""Sensors: ``manifest_sensor`` notices new, changed or removed manifests and asks for the record
cache; the feature assets follow through their eager automation condition, evaluated by
``feature_automation_sensor``.

The cursor is one digest per manifest root (``{root: sha256}``), never a file list, and a tick
only stats files (no manifest is read), so it stays fast with thousands of manifest files.

A tick never fails on the file system: a root that is missing or cannot be opened (vanished,
symlink loop, permission denied) is named in the skip message and the log, and no run is
requested until it is back (a rebuild would fail, or drop its rows); folders or files below a
root that cannot be listed are logged as warnings and named in the observation's metadata, and
the rest of the root is watched as usual.
"""

import hashlib
import json

import dagster as dg

from asr_assets.manifests import manifest_fingerprint
from asr_assets.settings import SPLITS

from .assets import MANIFESTS_KEY, record_cache
from .resources import AsrAssetsConfig


def manifests_version(digests: dict) -> str:
    """One version string for all roots (the ``manifests`` data version and run-key suffix)."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(root: str) -> dict:
    """:func:`manifest_fingerprint`, with any unexpected error turned into an unreadable root."""
    try:
        return manifest_fingerprint(root)
    except Exception as exc:  # noqa: BLE001 - a tick must not crash on one root
        return {"digest": "unreadable", "files": 0, "bytes": 0, "problems": [f"{root}: {type(exc).__name__}: {exc}"]}


def _shorten(items: list[str], limit: int = 5) -> str:
    return "; ".join(items[:limit]) + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


@dg.sensor(
    name="manifest_sensor",
    target=dg.AssetSelection.assets(record_cache),
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests record_cache for every split when a manifest root gains, changes or loses a manifest file.",
)
def manifest_sensor(context: dg.SensorEvaluationContext, asr_config: AsrAssetsConfig) -> dg.SensorResult:
    settings = asr_config.settings()
    roots = list(dict.fromkeys([*settings.manifests, *settings.validation_manifests]))
    fingerprints = {root: _fingerprint(root) for root in roots}
    digests = {root: fp["digest"] for root, fp in fingerprints.items()}
    try:
        previous = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        previous = {}
    unusable = [p for fp in fingerprints.values() if fp["digest"] in ("missing", "unreadable") for p in fp.get("problems", [])]
    partly = [p for fp in fingerprints.values() if fp["digest"] not in ("missing", "unreadable") for p in fp.get("problems", [])]
    if partly:
        context.log.warning(f"manifest entries that cannot be read (their rows are reported by record_cache): {_shorten(partly)}")
    if unusable:
        message = f"manifest roots that cannot be read, nothing requested until they are back: {_shorten(unusable)}"
        context.log.warning(message)
        return dg.SensorResult(skip_reason=dg.SkipReason(message))
    if digests == previous:
        unread = f"; {len(partly)} entries unreadable: {_shorten(partly, 3)}" if partly else ""
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"no new, changed or removed manifests in {len(roots)} roots{unread}"))
    changed = sorted(r for r in set(digests) | set(previous) if digests.get(r) != previous.get(r))
    version = manifests_version(digests)
    context.log.info(f"manifests changed in {changed}; requesting record_cache for {list(SPLITS)} (version {version})")
    # Any split may hold rows of a changed manifest (splits are hashed per speaker), so every
    # split is rebuilt; its data version changes only if its records did, which is what marks
    # feature partitions stale.
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=split, run_key=f"record_cache:{split}:{version}",
                                    tags={"asr/split": split, "asr/manifests_version": version}) for split in SPLITS],
        asset_events=[dg.AssetObservation(
            asset_key=MANIFESTS_KEY,
            metadata={"roots": dg.MetadataValue.json(fingerprints), "changed_roots": dg.MetadataValue.json(changed)},
            tags={"dagster/data_version": version},
        )],
        cursor=json.dumps(digests, sort_keys=True),
    )


def build_automation_sensor(assets) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the eager condition of ``assets`` (the feature assets and ``split_summary``):
    after ``record_cache[split]`` updates, the split's shards are requested as a backfill (one run
    per 64 shards, see the backfill policy); once every shard of a split is materialized and
    one has changed, ``split_summary[split]`` follows."""
    return dg.AutomationConditionSensorDefinition(
        "feature_automation_sensor",
        target=dg.AssetSelection.assets(*assets),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )
