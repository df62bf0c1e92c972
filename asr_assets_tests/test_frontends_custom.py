"""User-defined frontends registered with ``register_frontend``: cache key derived from the config
dict through the same code path as the built-ins, overrides, resampling, output checks, pickling.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

import asr_assets.frontends as frontends
from asr_assets.errors import FeatureConfigError, UnknownFrontendError
from asr_assets.frontends import available_frontends, get_frontend, register_frontend


def frame_energy(samples: np.ndarray) -> np.ndarray:
    """Toy 'SSL model': log energy of 320-sample frames -> float32 (num_frames, 2)."""
    n = samples.shape[0] // 320
    frames = samples[: n * 320].reshape(n, 320).astype(np.float64)
    energy = np.log((frames**2).sum(axis=1) + 1e-10)
    return np.stack([energy, np.arange(n, dtype=np.float64)], axis=1)


def energy_frames(num_samples: int) -> int:
    return num_samples // 320


@pytest.fixture
def registry(monkeypatch):
    """Isolate registrations made by a test."""
    monkeypatch.setattr(frontends, "_FACTORIES", dict(frontends._FACTORIES))
    return frontends._FACTORIES


def test_registered_hash_derives_from_config(registry):
    config = {"model": "hubert-base-ls960", "layer": 9, "revision": "abc123", "scale": 0.5}
    register_frontend("hubert-l9", frame_energy, config, feature_dim=2, min_num_samples=320,
                      frames_fn=energy_frames)
    assert "hubert-l9" in available_frontends()
    fe = get_frontend("hubert-l9")
    expected_repr = repr({"featurizer": {"type": "hubert-l9", **config}})
    assert fe.config_repr() == expected_repr
    assert fe.frontend_hash() == hashlib.sha256(expected_repr.encode()).hexdigest()[:12]
    assert get_frontend("hubert-l9", layer=6).frontend_hash() != fe.frontend_hash()
    assert get_frontend("hubert-l9", layer=9).frontend_hash() == fe.frontend_hash()
    with pytest.raises(FeatureConfigError, match="valid keys"):
        get_frontend("hubert-l9", device="cuda")

    x = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    y = fe(x, 16000)
    assert y.dtype == np.float32 and y.shape == (50, 2) == (fe.num_frames(16000), fe.feature_dim)
    np.testing.assert_allclose(y, frame_energy(x), rtol=1e-6)
    assert fe(x[::2].copy(), 8000).shape == (50, 2)  # resampled to 16 kHz first
    with pytest.raises(FeatureConfigError, match="at least 320 samples"):
        fe(x[:100], 16000)
    clone = pickle.loads(pickle.dumps(fe))
    np.testing.assert_array_equal(clone(x, 16000), y)


def test_decorator_form_and_duplicates(registry):
    @register_frontend("token-ids", config={"codec": "toy", "codebooks": 1})
    def tokens(samples):
        return np.sign(samples[::160])[:, None]

    assert tokens(np.ones(320, np.float32)).shape == (2, 1)  # still a plain function
    fe = get_frontend("token-ids")
    assert fe.config_dict() == {"type": "token-ids", "codec": "toy", "codebooks": 1}
    with pytest.raises(FeatureConfigError, match="already registered"):
        register_frontend("token-ids", tokens, {"codec": "other"})
    register_frontend("token-ids", tokens, {"codec": "other"}, replace=True)
    assert get_frontend("token-ids").config_dict()["codec"] == "other"
    with pytest.raises(FeatureConfigError, match="already registered"):
        register_frontend("squeezeformer", tokens, {})


def test_bad_registrations(registry):
    with pytest.raises(FeatureConfigError, match="needs a config dict"):
        register_frontend("x", frame_energy)
    with pytest.raises(FeatureConfigError, match="must not contain 'type'"):
        register_frontend("x", frame_energy, {"type": "y"})
    with pytest.raises(TypeError, match="cannot be part of a cache key"):
        register_frontend("x", frame_energy, {"weights": np.zeros(3)})
    register_frontend("wrong-dim", frame_energy, {"v": 1}, feature_dim=3)
    with pytest.raises(FeatureConfigError, match=r"expected \(num_frames, 3\)"):
        get_frontend("wrong-dim")(np.zeros(1600, np.float32), 16000)
    with pytest.raises(UnknownFrontendError):
        get_frontend("x")
