"""optim/schedules.py at step counts whose breakpoints are fractional (0.65 N not an integer: Python's round, half to
even), checked at every step against nanochat's schedules transcribed below from karpathy/nanochat@92d63d4
scripts/base_train.py (`get_lr_multiplier`, `get_muon_momentum`, `get_weight_decay`) with its defaults (warmup 40,
warmdown_ratio 0.65, final_lr_frac 0.05, momentum 0.85 -> 0.97 over 400 steps -> 0.90), plus hand-worked values."""

import math

import numpy as np
import pytest

from jaxchat.optim import schedules as S


def ref_lr(it, N, warmup=40, ratio=0.65, final=0.05):
    warmdown_iters = round(ratio * N)
    if it < warmup:
        return (it + 1) / warmup
    elif it <= N - warmdown_iters:
        return 1.0
    progress = (N - it) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final


def ref_momentum(it, N, ratio=0.65, ramp=400):
    warmdown_iters = round(ratio * N)
    warmdown_start = N - warmdown_iters
    if it < ramp:
        frac = it / ramp
        return (1 - frac) * 0.85 + frac * 0.97
    elif it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def ref_wd(it, N, wd=0.28):
    return wd * 0.5 * (1 + math.cos(math.pi * it / N))


# (N, warmup, ramp): 0.65 N = 6.5 (-> 6, half to even), 19.5 (-> 20), 4.55 (-> 5), 261.95, 39.65, 1300
CASES = [(10, 2, 3), (30, 4, 7), (7, 1, 2), (403, 40, 400), (61, 40, 400), (2000, 40, 400)]


def test_rounding_half_to_even_by_hand():
    assert [S.warmdown_iters(n) for n in (10, 30, 7, 403, 61, 2000)] == [6, 20, 5, 262, 40, 1300]
    assert S.warmdown_iters(10, 0.25) == 2 and S.warmdown_iters(14, 0.25) == 4  # 2.5 -> 2, 3.5 -> 4


@pytest.mark.parametrize("N,warmup,ramp", CASES)
def test_every_step_matches_nanochat(N, warmup, ramp):
    steps = np.arange(N + 1)
    lr = np.asarray(S.lr_multiplier(steps, N, warmup_steps=warmup))
    mom = np.asarray(S.muon_momentum(steps, N, ramp_steps=ramp))
    wd = np.asarray(S.muon_weight_decay(steps, N, 0.28))
    np.testing.assert_allclose(lr, [ref_lr(s, N, warmup) for s in steps], rtol=1e-6, atol=0)
    np.testing.assert_allclose(mom, [ref_momentum(s, N, ramp=ramp) for s in steps], rtol=1e-6, atol=0)
    np.testing.assert_allclose(wd, [ref_wd(s, N) for s in steps], rtol=1e-5, atol=1e-7)
    assert lr.min() > 0 and lr.max() == 1.0 and mom.min() >= 0.85 and wd[0] == pytest.approx(0.28)


def test_boundaries_by_hand_n10():
    """N = 10: warmdown 6 steps (6.5 rounds to 6), from step 4; warmup 2."""
    lr = [float(S.lr_multiplier(s, 10, warmup_steps=2)) for s in range(11)]
    assert lr[0] == pytest.approx(0.5) and lr[1] == 1.0 and lr[4] == 1.0
    assert lr[5] == pytest.approx(5 / 6 + (1 / 6) * 0.05)  # 0.841667, the first step below 1
    assert lr[9] == pytest.approx(1 / 6 + (5 / 6) * 0.05) and lr[10] == pytest.approx(0.05)
    mom = [float(S.muon_momentum(s, 10, ramp_steps=3)) for s in range(11)]
    assert mom[0] == pytest.approx(0.85) and mom[2] == pytest.approx(0.85 + 0.12 * 2 / 3)
    assert mom[3] == pytest.approx(0.97 - 0.07 * 0 / 6) and mom[4] == pytest.approx(0.97)  # warmdown starts at 4
    assert mom[5] == pytest.approx(0.97 - 0.07 / 6) and mom[10] == pytest.approx(0.90)


def test_custom_ratio_and_final_fraction():
    N = 9  # 0.5 * 9 = 4.5 -> 4: warmdown from step 5
    lr = [float(S.lr_multiplier(s, N, warmup_steps=1, warmdown_ratio=0.5, final_lr_frac=0.2)) for s in range(N + 1)]
    assert lr[5] == 1.0 and lr[6] == pytest.approx(0.75 + 0.25 * 0.2) and lr[9] == pytest.approx(0.2)
    mom = [float(S.muon_momentum(s, N, warmdown_ratio=0.5, start=0.5, peak=0.9, end=0.1, ramp_steps=2))
           for s in range(N + 1)]
    assert mom[1] == pytest.approx(0.7) and mom[4] == pytest.approx(0.9) and mom[5] == pytest.approx(0.9)
    assert mom[7] == pytest.approx(0.5) and mom[9] == pytest.approx(0.1)
