"""Feature frontends of asr_assets: audio -> ``float32 (num_frames, feature_dim)`` features
(or, for a user frontend registered with ``outputs=``, several named arrays of their own dtypes).

Public entry points:
    * :func:`get_frontend` - build a registered frontend by name, with config overrides.
    * :func:`available_frontends` - registered names.
    * :func:`compute_features` - one-call convenience: samples at any rate -> features.
    * :func:`register_frontend` - add a user-defined frontend (function + keyed config dict).
    * :class:`Frontend` - base class (cache key, frame counts, ``__call__``, ``batch``).

Built-in frontends:
    * ``squeezeformer`` / ``zipformer`` - HTK log-mel (:mod:`.logmel`, spec 4.2/4.3).
    * ``w2v-bert`` - Kaldi fbank + stride-2 stacking (:mod:`.w2v_bert`, spec 4.4).
    * ``ludwig-fbank``, ``ludwig-stft``, ``ludwig-stft_phase``, ``ludwig-group_delay``,
      ``ludwig-raw`` - Ludwig audio feature types (:mod:`.ludwig`).

Importing this package loads only numpy and :mod:`.base` / :mod:`.custom`: the built-in
frontends are registered by name, and a frontend's module (scipy, soxr lazily through
``asr_assets.audio``) is imported the first time :func:`get_frontend` builds it, so
``available_frontends()`` and CLI start-up stay cheap. ``LogMelFrontend``, ``LudwigFrontend`` and
``W2VBertFrontend`` are importable from here too (loaded on first access).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from asr_assets._lazy import lazy_getattr
from asr_assets.errors import FeatureConfigError, UnknownFrontendError

from .base import Frontend, py_float, render_config_repr
from .custom import CustomFrontend

if TYPE_CHECKING:  # loaded lazily at run time, see __getattr__
    from .logmel import LogMelFrontend
    from .ludwig import LudwigFrontend
    from .w2v_bert import W2VBertFrontend

__all__ = [
    "Frontend",
    "CustomFrontend",
    "LogMelFrontend",
    "LudwigFrontend",
    "W2VBertFrontend",
    "available_frontends",
    "compute_features",
    "get_frontend",
    "py_float",
    "register_frontend",
    "render_config_repr",
]

#: Public classes whose modules are imported on first access: name -> submodule.
_LAZY_CLASSES = {"LogMelFrontend": "logmel", "LudwigFrontend": "ludwig", "W2VBertFrontend": "w2v_bert"}
#: Ludwig feature types registered as ``ludwig-<type>`` (:data:`.ludwig.FEATURE_TYPES`; kept here
#: so registering them does not import the module; test_cli checks the two agree).
LUDWIG_FEATURE_TYPES = ("fbank", "stft", "stft_phase", "group_delay", "raw")


__getattr__ = lazy_getattr(__name__, _LAZY_CLASSES)


#: name -> factory(**overrides) -> Frontend
_FACTORIES: dict[str, Callable[..., Frontend]] = {}


def _register_factory(name: str, factory: Callable[..., Frontend], *, replace: bool = False) -> None:
    if not isinstance(name, str) or not name:
        raise FeatureConfigError(f"frontend name must be a non-empty str, got {name!r}")
    if name in _FACTORIES and not replace:
        raise FeatureConfigError(
            f"frontend {name!r} is already registered; pass replace=True to redefine it"
        )
    _FACTORIES[name] = factory


def available_frontends() -> list[str]:
    """Return the registered frontend names, sorted."""
    return sorted(_FACTORIES)


def _close_names(name: str) -> list[str]:
    """Registered names ``name`` is probably a typo of: the best difflib matches (ratio >= 0.6,
    within 0.05 of the best), else the names containing it (``fbank`` -> ``ludwig-fbank``)."""
    names = available_frontends()
    query = name.strip().lower()
    ratio = {n: difflib.SequenceMatcher(None, query, n).ratio() for n in difflib.get_close_matches(query, names, n=3)}
    if ratio:
        best = max(ratio.values())
        return [n for n, r in ratio.items() if r >= best - 0.05]
    return [n for n in names if len(query) >= 3 and query in n][:3]


def get_frontend(name: str, **overrides: Any) -> Frontend:
    """Build a registered frontend.

    Args:
        name: registry name, one of :func:`available_frontends`.
        **overrides: config fields to change, as the upstream CLI flags (e.g. ``n_fft=512``,
            which also sets ``win_length`` unless given). They change the cache key.

    Returns:
        A new :class:`Frontend`.

    Raises:
        UnknownFrontendError: ``name`` is not registered (the message suggests close names and
            lists the available ones).
        FeatureConfigError: unknown override key (the message lists the valid ones) or bad value.
    """
    try:
        factory = _FACTORIES[name]
    except (KeyError, TypeError):
        close = _close_names(name) if isinstance(name, str) else []
        suggestion = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownFrontendError(
            f"unknown frontend {name!r}{suggestion}; available frontends: {', '.join(available_frontends())}"
        ) from None
    return factory(**overrides)


def compute_features(
    samples: np.ndarray,
    sample_rate: int,
    frontend: str | Frontend = "squeezeformer",
    **overrides: Any,
) -> np.ndarray:
    """Compute features of one utterance.

    Args:
        samples: ``float (num_samples,)`` mono or ``float (num_channels, num_samples)``, in
            [-1, 1].
        sample_rate: rate of ``samples`` in Hz (resampled with soxr when it differs from the
            frontend's rate).
        frontend: a registry name or a :class:`Frontend` instance.
        **overrides: config overrides, only with a name.

    Returns:
        ``float32 (num_frames, feature_dim)``; ``{name: array}`` for a frontend with named outputs.
    """
    if isinstance(frontend, Frontend):
        if overrides:
            raise FeatureConfigError(
                "overrides can only be given with a frontend name, not with a Frontend instance"
            )
        fe = frontend
    else:
        fe = get_frontend(frontend, **overrides)
    return fe(samples, sample_rate)


def register_frontend(
    name: str,
    fn: Callable[[np.ndarray], np.ndarray] | None = None,
    config: dict[str, Any] | None = None,
    feature_dim: int | None = None,
    *,
    sample_rate: int = 16000,
    min_num_samples: int = 0,
    frames_fn: Callable[[int], int] | None = None,
    replace: bool = False,
    outputs: dict[str, Any] | None = None,
):
    """Register a user-defined frontend (e.g. precomputed SSL features or tokens).

    The cache key is derived from ``config`` exactly as for the built-in frontends:
    ``sha256(repr({"featurizer": {"type": name, **config}}))[:12]``. Put every setting that
    changes the output (model id, layer, revision, ...) in ``config`` and nothing runtime-only
    (device, workers, paths).

    Usable directly or as a decorator::

        @register_frontend("hubert-l9", config={"model": "hubert-base", "layer": 9},
                           feature_dim=768)
        def hubert_l9(samples_16k):          # float32 (num_samples,) -> (num_frames, 768)
            ...

    Several named features per utterance, each with its own dtype and cache key
    (``sha256(repr({"featurizer": {"type": name, **config, "output": output}}))[:12]``)::

        @register_frontend("hubert-l9-units", config={"model": "hubert-base", "layer": 9, "k": 500},
                           outputs={"ssl_feats": "float16", "tokens": "int32"})
        def hubert_units(samples_16k):      # -> {"ssl_feats": (frames, 768), "tokens": (frames,)}
            ...

    Each output is cast to its declared dtype and must be non-empty, frames first (1-D or 2-D)
    and, for floats, finite. float32 2-D outputs are stored as SFCF32L1, others as ``.npy``
    bytes (:func:`asr_assets.feature_cache.encode_features`); read one with
    ``ShardedParquetFeatureCache.load(uid, frontend, output="tokens")``.

    Args:
        name: registry name.
        fn: ``fn(samples float32 (num_samples,) at sample_rate) -> array (num_frames, dim)``;
            a module-level function so the frontend pickles. Omit to use as a decorator.
        config: JSON-like dict (bool/int/float/str/None/list/dict) that identifies the output.
        feature_dim: columns per frame; checked on every output when given (single output only).
        sample_rate: rate in Hz ``fn`` expects; input at other rates is resampled.
        min_num_samples: shortest valid input in samples at ``sample_rate``.
        frames_fn: optional exact ``num_samples -> num_frames`` (module-level too).
        replace: allow redefining an existing name.
        outputs: named outputs ``{name: numpy dtype}`` (bool/int/uint/float; order kept, the
            first gives the extractor's ``frames`` statistic); None (default): one float32
            ``(num_frames, feature_dim)`` output, keyed and stored exactly as before.

    Returns:
        ``fn`` (so the decorator form leaves the function usable), or the decorator.
    """
    if config is None:
        raise FeatureConfigError(f"register_frontend({name!r}) needs a config dict for its cache key")

    def decorator(func: Callable[[np.ndarray], np.ndarray]):
        proto = CustomFrontend(
            name,
            func,
            dict(config),
            feature_dim=feature_dim,
            sample_rate=sample_rate,
            min_num_samples=min_num_samples,
            frames_fn=frames_fn,
            outputs=outputs,
        )
        proto.config_repr()  # validate the config is renderable now, not at first use

        def factory(**overrides: Any) -> Frontend:
            return proto.with_overrides(overrides)

        _register_factory(name, factory, replace=replace)
        return func

    if fn is None:
        return decorator
    return decorator(fn)


# Built-in factories import their module when first called (see the module docstring).
def _squeezeformer(**overrides: Any) -> Frontend:
    from .logmel import SQUEEZEFORMER_CONFIG, LogMelFrontend, make_logmel_config

    return LogMelFrontend("squeezeformer", make_logmel_config(SQUEEZEFORMER_CONFIG, overrides))


def _zipformer(**overrides: Any) -> Frontend:
    from .logmel import ZIPFORMER_CONFIG, LogMelFrontend, make_logmel_config

    return LogMelFrontend("zipformer", make_logmel_config(ZIPFORMER_CONFIG, overrides))


def _w2v_bert(**overrides: Any) -> Frontend:
    from .w2v_bert import make_w2v_bert

    return make_w2v_bert(**overrides)


def _ludwig_factory(name: str) -> Callable[..., Frontend]:
    def make(**overrides: Any) -> Frontend:
        from .ludwig import FACTORIES

        return FACTORIES[name](**overrides)

    make.__name__ = make.__qualname__ = f"_{name.replace('-', '_')}"
    return make


_register_factory("squeezeformer", _squeezeformer)
_register_factory("zipformer", _zipformer)
_register_factory("w2v-bert", _w2v_bert)
for _type in LUDWIG_FEATURE_TYPES:
    _register_factory(f"ludwig-{_type}", _ludwig_factory(f"ludwig-{_type}"))
