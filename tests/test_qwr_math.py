"""Hand-computed checks of QWR's backups, TD(lambda) targets and actor weights
(qwr.md Section 2.3, Eq. 3, Eq. 6, Appendix 6.4)."""

import math

import pytest
import torch

from qwr_continuous import advantage_weights, backup_values, td_lambda_targets


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- backups (Eq. 6)


def test_mean_and_max_backups():
    q = t([[1.0, 5.0, 3.0, -1.0], [2.0, 2.0, 2.0, 8.0]])
    assert backup_values(q, "mean", 0.3, "mad").tolist() == [2.0, 3.5]
    assert backup_values(q, "max", 0.3, "mad").tolist() == [5.0, 8.0]


def test_lse_without_scale_is_tau_log_mean_exp():
    # log((e + e^2 + e^3 + e^4) / 4), by hand.
    out = backup_values(t([[1.0, 2.0, 3.0, 4.0]]), "lse", 1.0, "none")
    assert out.item() == pytest.approx(3.053895337441305, abs=1e-12)
    # tau = 2: 2 * log(mean(exp(q / 2))).
    out = backup_values(t([[1.0, 2.0, 3.0, 4.0]]), "lse", 2.0, "none")
    expected = 2 * math.log(sum(math.exp(x / 2) for x in [1, 2, 3, 4]) / 4)
    assert out.item() == pytest.approx(expected, abs=1e-12)


def test_lse_scale_is_one_scalar_over_the_whole_batch():
    # All four values: mean 3, mean absolute deviation (3+1+1+3)/4 = 2, std sqrt(5).
    q = t([[0.0, 2.0], [4.0, 6.0]])
    # s * tau = 1 in both cases below, so each row is log-mean-exp of its values.
    by_hand = [math.log((1 + math.e**2) / 2), 4 + math.log((1 + math.e**2) / 2)]
    assert backup_values(q, "lse", 0.5, "mad").tolist() == pytest.approx(by_hand, abs=1e-12)
    assert backup_values(q, "lse", 1 / math.sqrt(5), "std").tolist() == pytest.approx(by_hand, abs=1e-12)
    # A per-row scale would differ: row 0 alone has MAD 1, giving log((1 + e^4) / 2) / 2.
    assert backup_values(q[:1], "lse", 0.5, "mad").item() == pytest.approx(
        0.5 * math.log((1 + math.e**4) / 2), abs=1e-12
    )


def test_lse_limits_small_tau_gives_max_large_tau_gives_mean():
    q = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    for scale in ("mad", "std", "none"):
        assert torch.allclose(backup_values(q, "lse", 1e-6, scale), q.amax(-1), atol=1e-3)
        assert torch.allclose(backup_values(q, "lse", 1e6, scale), q.mean(-1), atol=1e-3)
        lse = backup_values(q, "lse", 0.3, scale)
        assert torch.all(lse >= q.mean(-1) - 1e-9) and torch.all(lse <= q.amax(-1) + 1e-9)


def test_lse_is_shift_and_scale_equivariant_with_mad():
    # s(X) scales with X, so F(a X + c) = a F(X) + c: the backup is unit-free.
    q = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = backup_values(q, "lse", 0.3, "mad")
    assert torch.allclose(backup_values(7.0 * q + 100.0, "lse", 0.3, "mad"), 7.0 * base + 100.0)


@pytest.mark.parametrize("scale", ["mad", "std"])
def test_lse_zero_scale_gives_the_mean_never_nan(scale):
    q = torch.full((8, 4), 3.25, requires_grad=True)  # every Q-value equal: s = 0
    out = backup_values(q, "lse", 0.3, scale)
    assert torch.isfinite(out).all() and torch.equal(out, torch.full((8,), 3.25))
    out.sum().backward()  # the gradient of the mean, not NaN from the 0 / 0 branch
    assert torch.equal(q.grad, torch.full((8, 4), 0.25))
    # Huge values with a tiny spread stay finite and between mean and max.
    q = torch.tensor([[1e6, 1e6 + 1e-1], [1e6, 1e6]], dtype=torch.float32)
    out = backup_values(q, "lse", 0.3, scale)
    assert torch.isfinite(out).all() and (out <= q.amax(-1)).all() and (out >= q.mean(-1)).all()


# ---------------------------------------------------------------- TD(lambda) (App. 6.4)

R, F = t([1.0, 2.0, 3.0]), t([10.0, 20.0, 30.0])
NO = torch.zeros(3, dtype=torch.bool)
# With gamma = 0.9: Q_1 = 1 + .9*10 = 10, Q_2 = 1 + 1.8 + .81*20 = 19,
# Q_3 = 1 + 1.8 + 2.43 + .729*30 = 27.1.


def targets(lam, terminated=NO, last=NO, rewards=R, bootstrap=F, gamma=0.9):
    return td_lambda_targets(rewards, bootstrap, terminated, last, gamma, lam).item()


def test_td_lambda_hand_example():
    # (1 - .5) * 10 + .5 * .5 * 19 + .5^2 * 27.1: the last target takes the remainder.
    assert targets(0.5) == pytest.approx(16.525, abs=1e-12)


def test_td_lambda_zero_is_one_step_and_one_is_T_step():
    assert targets(0.0) == pytest.approx(10.0, abs=1e-12)
    assert targets(1.0) == pytest.approx(27.1, abs=1e-12)
    one_step = td_lambda_targets(R[:1], F[:1], NO[:1], NO[:1], 0.9, 0.5).item()
    assert one_step == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_td_lambda_weights_sum_to_one(lam, n):
    ones, no = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    # gamma = 1, no rewards, every bootstrap 1: the target is the sum of the weights.
    assert td_lambda_targets(0 * ones, ones, no, no, 1.0, lam).item() == pytest.approx(1.0, abs=1e-12)


def test_td_lambda_termination_stops_bootstrapping():
    ended = t([0, 1, 0]).bool()
    # Q_1 = 10; Q_2 = Q_3 = 1 + .9 * 2 (no bootstrap after the terminal step 1).
    assert targets(0.5, terminated=ended, last=ended) == pytest.approx(0.5 * 10 + 0.5 * 2.8, abs=1e-12)
    first = t([1, 0, 0]).bool()
    assert targets(0.5, terminated=first, last=first) == pytest.approx(1.0, abs=1e-12)


def test_td_lambda_truncation_bootstraps_from_the_final_state():
    ended = t([0, 1, 0]).bool()
    # Q_1 = 10; Q_2 = Q_3 = 19, bootstrapped from the final observation after step 1.
    assert targets(0.5, last=ended) == pytest.approx(0.5 * 10 + 0.5 * 19, abs=1e-12)


def test_td_lambda_never_reads_past_an_episode_end():
    # Whatever lies after the end (the next episode, or garbage) cannot leak in.
    bad_r, bad_f = t([1.0, 2.0, float("nan")]), t([10.0, 20.0, float("inf")])
    for terminated in (NO, t([0, 1, 0]).bool()):
        last = t([0, 1, 0]).bool()
        clean = targets(0.5, terminated=terminated, last=last)
        assert targets(0.5, terminated=terminated, last=last, rewards=bad_r, bootstrap=bad_f) == clean


def test_td_lambda_batches_independently():
    rewards, boot = torch.stack([R, R]), torch.stack([F, F])
    terminated = torch.stack([NO, t([0, 1, 0]).bool()])
    out = td_lambda_targets(rewards, boot, terminated, terminated, 0.9, 0.5)
    assert out.tolist() == pytest.approx([16.525, 6.4], abs=1e-12)


# ---------------------------------------------------------------- actor weights (Eq. 3)


def test_advantage_weights_by_hand():
    q = t([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    # Advantages [-1.5, -.5, .5, 1.5] and [0, 0, 0, 0]; batch mean 0, std sqrt(5/8).
    std = math.sqrt(5 / 8)
    expected = [[math.exp(a / std) for a in (-1.5, -0.5, 0.5, 1.5)], [1.0] * 4]
    assert torch.allclose(advantage_weights(q, 1.0, 20.0), t(expected), rtol=1e-4)
    # beta = 2 halves the exponent; max_weight = 5 clips exp(1.5 / std) = 6.67.
    assert advantage_weights(q, 2.0, 20.0)[0].tolist() == pytest.approx(
        [math.exp(a / std / 2) for a in (-1.5, -0.5, 0.5, 1.5)], rel=1e-4
    )
    assert advantage_weights(q, 1.0, 5.0)[0, 3].item() == pytest.approx(5.0)


def test_advantage_weights_are_finite_and_clipped_for_extreme_values():
    q = torch.zeros(1024, 4)
    q[0, 0] = 1e3  # normalised advantage ~55, / beta = 5500: exp() overflows unclipped
    assert torch.isinf(torch.exp(torch.tensor(5500.0)))
    w = advantage_weights(q, 0.01, 20.0)
    assert torch.isfinite(w).all() and w.max().item() == pytest.approx(20.0) and (w >= 0).all()
    # Equal Q-values: zero advantages, every weight exactly 1.
    assert torch.equal(advantage_weights(torch.ones(4, 4), 1.0, 20.0), torch.ones(4, 4))
