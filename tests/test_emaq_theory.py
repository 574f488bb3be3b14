"""EMaQ's backup operator T^N_mu (emaq.md Eq. 5) and Theorems 3.1-3.5, exactly,
on small random MDPs whose behaviour policy mu leaves some actions out.

The expectation over N actions drawn from mu is computed exactly from order
statistics: with the actions of a state sorted by Q and F the cumulative
mass of mu along that order, the best of N draws is the i-th action with
probability F_i^N - F_(i-1)^N. A brute-force sum over all A^N draws checks it,
and emaq_offline.py's target, with tables for its networks, estimates it.
"""

import itertools

import numpy as np
import pytest
import torch

import emaq_offline as emaq
from tests.tabular import q_of_policy, random_mdp

GAMMA = 0.9
S, A = 5, 4


def behaviour(seed: int) -> np.ndarray:
    """mu[s, a] with one or two actions of each state outside its support."""
    rng = np.random.default_rng(seed)
    mu = rng.random((S, A)) + 0.1
    for s in range(S):
        mu[s, rng.choice(A, size=1 + s % 2, replace=False)] = 0.0
    return mu / mu.sum(-1, keepdims=True)


def best_of_n_policy(Q: np.ndarray, mu: np.ndarray, n: int) -> np.ndarray:
    """pi^N_mu[s, a]: the probability that a is the best (by Q) of N draws from mu
    (ties go to the action sorted last, which leaves every expectation unchanged)."""
    order = np.argsort(Q, -1, kind="stable")
    cdf = np.cumsum(np.take_along_axis(mu, order, -1), -1)
    p_sorted = cdf**n - np.concatenate([np.zeros((len(Q), 1)), cdf[:, :-1]], -1) ** n
    pi = np.zeros_like(mu)
    np.put_along_axis(pi, order, p_sorted, -1)
    return pi


def expected_max(Q: np.ndarray, mu: np.ndarray, n: int) -> np.ndarray:
    """E_{a_1..a_N ~ mu(.|s)} max_i Q(s, a_i), per state."""
    return (best_of_n_policy(Q, mu, n) * Q).sum(-1)


def emaq_operator(P, R, mu, Q, n):
    """T^N_mu Q = r + gamma E_s' E_{a_1..N ~ mu(.|s')} max_i Q(s', a_i)."""
    return R + GAMMA * P @ expected_max(Q, mu, n)


def emaq_fixed_point(P, R, mu, n, tol=1e-13):
    Q = np.zeros_like(R)
    while True:
        new = emaq_operator(P, R, mu, Q, n)
        if np.abs(new - Q).max() < tol:
            return new
        Q = new


def support_optimal_q(P, R, mu, tol=1e-13):
    """Q*_mu: value iteration over the actions in mu's support only."""
    Q = np.zeros_like(R)
    while True:
        new = R + GAMMA * P @ np.where(mu > 0, Q, -np.inf).max(-1)
        if np.abs(new - Q).max() < tol:
            return new
        Q = new


def test_exact_expected_max_equals_the_sum_over_all_draws():
    rng = np.random.default_rng(0)
    mu, Q = behaviour(1), rng.normal(size=(S, A))
    Q[0, 1] = Q[0, 2]  # a tie
    for n in (1, 2, 3):
        brute = np.zeros(S)
        for draw in itertools.product(range(A), repeat=n):
            brute += np.prod(mu[:, draw], -1) * Q[:, draw].max(-1)
        np.testing.assert_allclose(expected_max(Q, mu, n), brute, atol=1e-14)


class TabularMu:
    """The behaviour model as a table: N actions drawn independently from mu[s] (s the first feature)."""

    def __init__(self, mu: np.ndarray):
        self.mu = torch.as_tensor(mu)

    def sample(self, obs, n):
        return torch.multinomial(self.mu[obs[:, 0].long()], n, replacement=True).unsqueeze(-1).double()  # [B, N, 1]


def test_the_scripts_target_is_a_sample_of_the_operator():
    # emaq_offline.emaq_target with mu and a one-member Q as tables draws N actions per transition; averaged
    # over 20000 transitions into each s', r + gamma max_i Q(s', a'_i) meets the exact T^N_mu Q of Eq. 5.
    mu, Q = behaviour(13), np.random.default_rng(14).normal(size=(S, A))
    table = torch.as_tensor(Q)
    q_net = lambda obs, action: table[obs[:, 0].long(), action[:, 0].long()][None]  # noqa: E731  [K = 1, B]
    copies, next_s = 20_000, torch.arange(S).repeat_interleave(20_000)
    batch = dict(next_obs=next_s[:, None].double(), reward=torch.ones(len(next_s), dtype=torch.float64),
                 terminated=torch.zeros(len(next_s), dtype=torch.bool))
    torch.manual_seed(0)
    for n in (1, 3, 10):  # (gamma E max over 1, 3, 10 draws: 0.08 or more apart in each state; sampling error 0.01)
        y = emaq.emaq_target(batch, TabularMu(mu), q_net, n, 1.0, GAMMA).view(S, copies).mean(1)
        np.testing.assert_allclose(y.numpy(), 1 + GAMMA * expected_max(Q, mu, n), atol=0.03)


@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_theorem_3_1_the_operator_is_a_gamma_contraction(n):
    P, R = random_mdp(S, A, seed=2)
    mu, rng = behaviour(3), np.random.default_rng(4)
    for _ in range(50):
        Q1, Q2 = rng.normal(size=(S, A)) * 5, rng.normal(size=(S, A)) * 5
        gap = np.abs(emaq_operator(P, R, mu, Q1, n) - emaq_operator(P, R, mu, Q2, n)).max()
        assert gap <= GAMMA * np.abs(Q1 - Q2).max() + 1e-12


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_theorem_3_2_the_fixed_point_is_the_q_value_of_best_of_n_sampling(n):
    P, R = random_mdp(S, A, seed=5)
    mu = behaviour(6)
    Q_n = emaq_fixed_point(P, R, mu, n)
    pi_n = best_of_n_policy(Q_n, mu, n)
    np.testing.assert_allclose(Q_n, q_of_policy(P, R, pi_n, GAMMA), atol=1e-10)
    assert np.all(pi_n[mu == 0] == 0)  # it never leaves mu's support


def test_theorem_3_3_n_1_evaluates_mu_and_large_n_reaches_the_support_optimum():
    P, R = random_mdp(S, A, seed=7)
    mu = behaviour(8)
    np.testing.assert_allclose(emaq_fixed_point(P, R, mu, 1), q_of_policy(P, R, mu, GAMMA), atol=1e-10)
    q_star_mu = support_optimal_q(P, R, mu)
    gaps = [np.abs(emaq_fixed_point(P, R, mu, n) - q_star_mu).max() for n in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-10
    # Q*_mu is below the unrestricted Q* wherever mu's support excludes the best action.
    q_star = R.copy()
    for _ in range(2000):
        q_star = R + GAMMA * P @ q_star.max(-1)
    assert np.all(q_star_mu <= q_star + 1e-10) and np.any(q_star_mu < q_star - 1e-3)


def test_theorem_3_4_fixed_points_increase_with_n_on_the_support():
    P, R = random_mdp(S, A, seed=9)
    mu = behaviour(10)
    fixed = [emaq_fixed_point(P, R, mu, n) for n in range(1, 12)]
    for lower, higher in zip(fixed, fixed[1:]):
        assert np.all(higher[mu > 0] >= lower[mu > 0] - 1e-12)
    assert np.any(fixed[-1] > fixed[0] + 1e-3)  # and strictly somewhere


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_theorem_3_5_suboptimality_bound(n):
    P, R = random_mdp(S, A, seed=11)
    mu = behaviour(12)
    Q_n, q_star_mu = emaq_fixed_point(P, R, mu, n), support_optimal_q(P, R, mu)
    error = np.abs(Q_n - q_star_mu).max()
    for Q in (q_star_mu, Q_n):  # Delta defined with Q*_mu, or with Q^N_mu
        delta = np.where(mu > 0, Q, -np.inf).max(-1) - expected_max(Q, mu, n)
        bound_8 = GAMMA / (1 - GAMMA) * (P @ delta).max()  # max over (s, a) of E_s' Delta(s', N)
        bound_9 = GAMMA / (1 - GAMMA) * delta.max()
        assert error <= bound_8 + 1e-10 <= bound_9 + 2e-10
