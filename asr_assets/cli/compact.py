"""``asr-assets compact``: one part per shard and frontend; safe while readers run."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..settings import SPLITS, Settings


def add_parser(sub) -> argparse.ArgumentParser:
    comp = sub.add_parser("compact", help="merge each shard's parts into one (newest row per key, tombstones dropped)")
    comp.add_argument("--output", metavar="DIR", help="output root (default: $ASR_ASSETS_OUTPUT or artifacts/)")
    comp.add_argument("--frontend", action="append", metavar="NAME",
                      help="only this frontend; repeatable (default: every frontend found in the parts)")
    comp.add_argument("--split", action="append", choices=SPLITS, help="split; repeatable (default: all)")
    return comp


def run(args: argparse.Namespace) -> int:
    """Compact the shards of the chosen splits and frontends; one summary line each.

    Raises:
        AsrAssetsError: a bad setting, an unknown ``--frontend`` or a missing output folder.
    """
    settings = Settings.from_env(output=args.output)
    hashes = {settings.frontend(name).frontend_hash() for name in args.frontend} if args.frontend else None
    if not settings.output_path.is_dir():
        raise ConfigError(f"output folder {str(settings.output_path)!r} does not exist (nothing to compact)")
    from ..feature_cache import compact_split

    for split in args.split or SPLITS:
        for frontend_hash, totals in compact_split(settings.feature_split_root(split), hashes).items():
            print(f"{split} [{frontend_hash}]: parts {totals['parts_before']} -> {totals['parts_after']}, "
                  f"rows {totals['rows_before']} -> {totals['rows_after']}, tombstones dropped {totals['tombstones_dropped']}")
    return 0
