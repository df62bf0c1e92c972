"""A frontend that takes its time (used by test_cli.py's Ctrl-C test): ``slow-energy`` is
plugin_example's frame energy after a pause of ``$ASR_ASSETS_TEST_PAUSE_S`` seconds (default
0.5), and it touches the file ``$ASR_ASSETS_TEST_STARTED`` when an utterance starts, so a test
knows that a feature run is under way. (``ASR_ASSETS_*`` variables reach the feature workers.)
"""

import os
import time
from pathlib import Path

import numpy as np

from asr_assets.frontends import register_frontend

from .plugin_example import frame_energy, frame_energy_frames


@register_frontend("slow-energy", config={"frame_length": 400, "hop_length": 160, "floor": 1e-10, "slow": True},
                   feature_dim=1, min_num_samples=400, frames_fn=frame_energy_frames)
def slow_energy(samples: np.ndarray) -> np.ndarray:
    started = os.environ.get("ASR_ASSETS_TEST_STARTED")
    if started:
        Path(started).touch()
    time.sleep(float(os.environ.get("ASR_ASSETS_TEST_PAUSE_S", "0.5")))
    return frame_energy(samples)
