"""``asr-assets frontends``: name, feature dim and cache hash of every registered frontend."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("frontends", help="list the registered frontends with their feature dim and cache hash")


def run(args: argparse.Namespace) -> int:
    from ..frontends import available_frontends, get_frontend

    for name in available_frontends():
        fe = get_frontend(name)
        print(f"{name:<16} dim {fe.feature_dim:<5} hash {fe.frontend_hash()}")
    return 0
