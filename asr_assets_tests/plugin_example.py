"""A frontend plugin as a user would write one (used by test_plugins.py): importing this module
registers ``frame-energy``, the log energy of 25 ms frames every 10 ms, ``float32 [frames, 1]``.

Stands in for precomputed SSL features or discrete tokens from a heavy model: the function is
module-level so worker processes can unpickle it, and the config dict is what keys the cache.
"""

import numpy as np

from asr_assets.frontends import register_frontend


def frame_energy_frames(num_samples: int) -> int:
    return 0 if num_samples < 400 else 1 + (num_samples - 400) // 160


@register_frontend("frame-energy", config={"frame_length": 400, "hop_length": 160, "floor": 1e-10},
                   feature_dim=1, min_num_samples=400, frames_fn=frame_energy_frames)
def frame_energy(samples: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(samples.astype(np.float64), 400)[::160]
    return np.log(np.maximum((frames**2).mean(axis=1), 1e-10)).astype(np.float32)[:, None]
