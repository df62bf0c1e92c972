"""Numerics that do not depend on the BLAS: kernel, thread count, batch composition.

Scope: :class:`asr_assets.frontends.base.MelBands` returns, for every element, the float32
nearest the exact sum of its float32 terms (checked against :func:`math.fsum`, including the
fallback path for elements near a rounding boundary); the frontends give the same bits with 1
and 2 BLAS threads and with an utterance at every position of a block; feature workers run
their BLAS with one thread (asserted from inside a worker process). The suite passes on the
OpenBLAS kernels named in the README (run with this machine's ``OPENBLAS_CORETYPE`` as it is).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import threadpoolctl

from asr_assets.frontends import get_frontend
from asr_assets.frontends.base import MelBands
from asr_assets.frontends.logmel import htk_mel_filterbank
from asr_assets.frontends.w2v_bert import kaldi_mel_filterbank

from asr_assets_tests.conftest import REPO


@pytest.fixture(scope="module")
def sample_speech() -> np.ndarray:
    """4.5 s of the JFK inaugural (public domain), float32 16 kHz (see data/README.md)."""
    with np.load(REPO / "asr_assets_tests" / "data" / "ref_jfk16k.npz") as ref:
        return np.ascontiguousarray(ref["samples"], dtype=np.float32)


def _exact_mel(spec: np.ndarray, fbank: np.ndarray) -> np.ndarray:
    """float32 nearest ``sum_k p_k w_k`` (p = float32 re^2 + im^2, w = float32 weights), by fsum."""
    sq = spec.view(np.float32).astype(np.float32) ** 2
    power = (sq[:, 0::2] + sq[:, 1::2]).astype(np.float64)  # float32 sum, as the frontend does
    w = fbank.astype(np.float32).astype(np.float64)
    out = np.empty((spec.shape[0], w.shape[1]), np.float32)
    for i in range(spec.shape[0]):
        for m in range(w.shape[1]):
            out[i, m] = np.float32(math.fsum(power[i] * w[:, m]))  # products of float32 are exact
    return out


def _spectrum(rng: np.random.Generator, rows: int, bins: int) -> np.ndarray:
    # magnitudes over 12 decades, as in speech with near-silent bands
    scale = 10.0 ** rng.uniform(-6, 6, size=(rows, 1))
    return ((rng.standard_normal((rows, bins)) + 1j * rng.standard_normal((rows, bins))) * scale).astype(np.complex64)


@pytest.mark.parametrize("fbank", [htk_mel_filterbank(201, 80, 16000), kaldi_mel_filterbank(257, 80, 16000)],
                         ids=["htk-201", "kaldi-257"])
def test_mel_projection_is_the_rounded_exact_sum(fbank):
    rng = np.random.default_rng(7)
    bands = MelBands(fbank)
    spec = _spectrum(rng, 40, fbank.shape[0])
    expected = _exact_mel(spec, fbank)
    out = np.empty((40, 80), np.float32)
    bands.power_mel(spec.copy(), out)
    np.testing.assert_array_equal(out, expected)
    # the same rows inside a bigger block, at other positions, one row alone (a GEMV)
    big = _spectrum(rng, 300, fbank.shape[0])
    big[123:163] = spec
    out_big = np.empty((300, 80), np.float32)
    bands.power_mel(big, out_big)
    np.testing.assert_array_equal(out_big[123:163], expected)
    one = np.empty((1, 80), np.float32)
    bands.power_mel(spec[17:18].copy(), one)
    np.testing.assert_array_equal(one[0], expected[17])


def test_mel_projection_fallback_is_exact(monkeypatch):
    """With a huge error bound every element takes the fsum path: still the exact rounding."""
    fbank = htk_mel_filterbank(201, 80, 16000)
    bands = MelBands(fbank)
    monkeypatch.setattr(bands, "_rel_bound", 1e-3)
    spec = _spectrum(np.random.default_rng(3), 12, 201)
    out = np.empty((12, 80), np.float32)
    bands.power_mel(spec.copy(), out)
    np.testing.assert_array_equal(out, _exact_mel(spec, fbank))


def test_mel_projection_rejects_negative_weights():
    with pytest.raises(ValueError, match="non-negative"):
        MelBands(-np.ones((10, 4)))


@pytest.mark.parametrize("name", ["squeezeformer", "zipformer", "w2v-bert"])
def test_frontends_ignore_blas_threads_and_position(name, sample_speech):
    fe = get_frontend(name)
    x = sample_speech
    utts = [x[: 16000 * 3 + 11], x[5000:5000 + 400 + 160 * 300], x[777:777 + 4000]]
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        singles = [fe.batch([u])[0] for u in utts]
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        for pad in (0, 1, 3, 64, 200):  # an utterance of `pad` frames before each one
            lead = x[: 400 + 160 * pad] if pad else x[:400]
            batched = fe.batch([lead, *utts])[1:]
            for a, b in zip(batched, singles, strict=True):
                np.testing.assert_array_equal(a, b)


def test_feature_workers_run_blas_with_one_thread():
    from asr_assets import extraction
    from asr_assets.audio import DecodeConfig

    state = (get_frontend("squeezeformer"), DecodeConfig(), None)
    with extraction._pool(1, state) as pool:
        info = pool.submit(threadpoolctl.threadpool_info).result()
    blas = [lib for lib in info if lib["user_api"] == "blas"]
    assert blas, info  # numpy's OpenBLAS at least
    assert all(lib["num_threads"] == 1 for lib in blas), blas
