"""User-defined frontends: any function + a keyed config dict.

Public entry point: :class:`CustomFrontend`, created by
:func:`asr_assets.frontends.register_frontend`. It lets features or tokens computed by a heavy
model (SSL encoders, codecs) go through the same cache-key machinery as the built-in
frontends: the key is ``sha256(repr({"featurizer": {"type": name, **config}}))[:12]``.

With ``outputs={name: dtype}`` the function returns several named arrays per utterance (e.g.
``{"ssl_feats": float16 (frames, 768), "tokens": int32 (frames,)}``); each is cast to its
declared dtype and checked (:func:`asr_assets.frontends.base.check_named_outputs`) and cached
under its own key, :meth:`~asr_assets.frontends.Frontend.output_hash`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from asr_assets.errors import FeatureConfigError

from .base import Frontend, check_output_dtypes


class CustomFrontend(Frontend):
    """Frontend that wraps a user function.

    Args:
        name: registry name; stored in the keyed config as ``"type"``.
        fn: ``fn(samples float32 (num_samples,) at sample_rate Hz) -> array
            (num_frames, feature_dim)``; its output is cast to float32. With ``outputs``:
            ``-> {name: array (num_frames, ...)}`` with exactly the declared names.
        config: settings that identify the output (model, layer, revision, ...); with
            ``outputs`` it must not contain ``"output"`` (each output's key adds it).
        feature_dim: expected number of columns, checked on every output (None: not checked);
            single-output frontends only.
        sample_rate: rate in Hz ``fn`` expects.
        min_num_samples: shortest valid input, in samples at ``sample_rate``.
        frames_fn: optional exact ``num_samples -> num_frames``; without it :meth:`num_frames`
            raises ``NotImplementedError``.
        outputs: named outputs ``{name: numpy dtype}`` (bool/int/uint/float), or None for one
            float32 output.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[np.ndarray], np.ndarray],
        config: dict[str, Any],
        *,
        feature_dim: int | None = None,
        sample_rate: int = 16000,
        min_num_samples: int = 0,
        frames_fn: Callable[[int], int] | None = None,
        outputs: dict[str, Any] | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if "type" in config:
            raise FeatureConfigError(
                f"config of frontend {name!r} must not contain 'type': it is set to the name"
            )
        if outputs is not None:
            outputs = check_output_dtypes(name, outputs)
            if feature_dim is not None:
                raise FeatureConfigError(f"frontend {name!r}: feature_dim applies to single-output frontends; "
                                         "a frontend with outputs= has one width per output")
            if "output" in config:
                raise FeatureConfigError(f"config of frontend {name!r} must not contain 'output': each named "
                                         "output's key adds it")
        self.name = name
        self.fn = fn
        self.outputs = outputs
        self.config = dict(config)
        self.feature_dim = int(feature_dim) if feature_dim is not None else 0
        self._check_dim = feature_dim is not None
        self.sample_rate = int(sample_rate)
        self.min_num_samples = int(min_num_samples)
        self.frames_fn = frames_fn

    def config_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.config}

    def with_overrides(self, overrides: dict[str, Any]) -> "CustomFrontend":
        """Return a copy with config values replaced (only existing keys are accepted)."""
        unknown = sorted(set(overrides) - set(self.config))
        if unknown:
            raise FeatureConfigError(
                f"unknown override(s) {unknown!r} for frontend {self.name!r}; "
                f"valid keys: {list(self.config)}"
            )
        clone = CustomFrontend(
            self.name,
            self.fn,
            {**self.config, **overrides},
            feature_dim=self.feature_dim if self._check_dim else None,
            sample_rate=self.sample_rate,
            min_num_samples=self.min_num_samples,
            frames_fn=self.frames_fn,
            outputs=self.outputs,
        )
        return clone

    def num_frames(self, num_samples_16k: int) -> int:
        if self.frames_fn is None:
            raise NotImplementedError(
                f"frontend {self.name!r} was registered without frames_fn; frame counts are "
                "known only after computing features"
            )
        return int(self.frames_fn(int(num_samples_16k)))

    def batch(self, samples_16k: Sequence[np.ndarray]) -> list:
        """Per utterance: ``float32 (num_frames, feature_dim)``, or with :attr:`outputs` the
        checked ``{name: array of its dtype}`` (:meth:`check_outputs`)."""
        outs: list = []
        for x in samples_16k:
            self.check_length(np.asarray(x).shape[0])
            if self.outputs is not None:
                outs.append(self.check_outputs(self.fn(np.asarray(x, dtype=np.float32))))
                continue
            y = np.asarray(self.fn(np.asarray(x, dtype=np.float32)), dtype=np.float32)
            if y.ndim == 1:
                y = y[:, None]
            if y.ndim != 2 or (self._check_dim and y.shape[1] != self.feature_dim):
                raise FeatureConfigError(
                    f"frontend {self.name!r} returned shape {y.shape!r}; expected "
                    f"(num_frames, {self.feature_dim if self._check_dim else 'feature_dim'})"
                )
            outs.append(np.ascontiguousarray(y))
        return outs
