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
from fractions import Fraction

import numpy as np
import pytest
import threadpoolctl

from asr_assets.frontends import get_frontend
from asr_assets.frontends.base import MelBands, exact_dot_f32
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
    monkeypatch.setattr(bands, "_ulps", 2**28)  # every element counts as near a rounding midpoint
    spec = _spectrum(np.random.default_rng(3), 12, 201)
    out = np.empty((12, 80), np.float32)
    bands.power_mel(spec.copy(), out)
    np.testing.assert_array_equal(out, _exact_mel(spec, fbank))


def _round_f32(value: Fraction) -> np.float32:
    """Correctly rounded (ties to even) float32 of an exact rational."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(c.view(np.uint32)) & 1))


def test_mel_projection_near_rounding_midpoints():
    """Sums engineered to lie within ~1e-14 (relative) of a float32 midpoint, where the order
    of a float64 GEMM could decide the rounding: still the correctly rounded exact sum."""
    fbank = htk_mel_filterbank(201, 80, 16000)
    w32 = fbank.astype(np.float32)
    bands = MelBands(fbank)
    rng = np.random.default_rng(11)
    wide = [m for m in range(80) if np.count_nonzero(w32[:, m]) >= 2]
    f = lambda x: Fraction(float(x))  # noqa: E731
    spec = np.zeros((300, 201), np.complex64)
    targets = []
    for i in range(spec.shape[0]):
        m = wide[i % len(wide)]
        k1, k2 = np.nonzero(w32[:, m])[0][:2]
        base = np.float32(rng.uniform(1.0, 2.0) * 10.0 ** rng.integers(-3, 4))
        midpoint = f(base) + f(np.spacing(base)) / 2
        re1 = np.float32(np.sqrt(float(midpoint / f(w32[k1, m])) * (1 - 1e-6)))  # a little short
        rest = midpoint - f(np.square(re1)) * f(w32[k1, m])
        re2 = np.float32(np.sqrt(float(rest / f(w32[k2, m]))))
        # the float32 re2 (near that root) whose square brings the sum closest to the midpoint
        steps, down, up = [re2], re2, re2
        for _ in range(40):
            down, up = np.nextafter(down, np.float32(0)), np.nextafter(up, np.float32(9))
            steps += [down, up]
        re2 = min(steps, key=lambda r: abs(f(np.square(re1)) * f(w32[k1, m]) + f(np.square(r)) * f(w32[k2, m]) - midpoint))
        spec[i, k1], spec[i, k2] = re1, re2
        targets.append((m, midpoint))
    squared = np.square(spec.real)  # what the frontend squares in float32 (imaginary parts are 0)
    out = np.empty((spec.shape[0], 80), np.float32)
    bands.power_mel(spec, out)
    near = 0
    for i, (m, midpoint) in enumerate(targets):
        exact = sum((f(squared[i, k]) * f(w32[k, m]) for k in np.nonzero(w32[:, m])[0]), Fraction(0))
        assert out[i, m] == _round_f32(exact), (i, m)
        near += abs(exact - midpoint) < midpoint * Fraction(1, 10**13)
    assert near > 200  # most sums really sit next to a midpoint: the hard case is exercised


def test_exact_dot_breaks_float64_ties_exactly():
    """A sum whose float64 rounding lands exactly on a float32 midpoint: the exact sum decides."""
    lo = np.float32(1.5)
    mid = (float(lo) + float(np.nextafter(lo, np.float32(2)))) / 2
    assert exact_dot_f32(np.array([mid, 2.0**-80]), np.ones(2)) == np.nextafter(lo, np.float32(2))
    assert exact_dot_f32(np.array([mid, -(2.0**-80)]), np.ones(2)) == lo
    assert exact_dot_f32(np.array([mid, 0.0]), np.ones(2)) == np.float32(mid)  # a true tie: to even


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
