"""Partitions: record cache by split; features by split x shard.

Multi-partition keys are the dimension values joined by ``|`` in alphabetical order of the
dimension *names* (``shard`` < ``split``), so shard 7 of train is ``"07|train"``.
"""

import dagster as dg

from asr_assets.settings import SPLITS

NUM_SHARDS = 64

split_partitions = dg.StaticPartitionsDefinition(list(SPLITS))
shard_partitions = dg.StaticPartitionsDefinition([f"{i:02d}" for i in range(NUM_SHARDS)])
feature_partitions = dg.MultiPartitionsDefinition({"split": split_partitions, "shard": shard_partitions})


def feature_partition_key(split: str, shard: int) -> str:
    """``"07|train"`` for shard 7 of train."""
    return str(dg.MultiPartitionKey({"split": split, "shard": f"{shard:02d}"}))


def parse_feature_partition_key(key: str) -> tuple[str, int]:
    """``"07|train"`` -> ``("train", 7)``."""
    dims = feature_partitions.get_partition_key_from_str(key).keys_by_dimension
    return dims["split"], int(dims["shard"])
