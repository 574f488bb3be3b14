"""Exact solutions of small tabular MDPs with numpy, shared by the theorem tests.

An MDP is (P, R): P[s, a, s'] transition probabilities, R[s, a] expected
rewards; a policy is pi[s, a]. Terminal states are absorbing with reward 0.
"""

import itertools
import math

import numpy as np


def random_mdp(n_states: int, n_actions: int, seed: int):
    rng = np.random.default_rng(seed)
    P = rng.random((n_states, n_actions, n_states)) ** 3  # uneven, all positive
    P /= P.sum(-1, keepdims=True)
    R = rng.normal(size=(n_states, n_actions))
    return P, R


def random_policy(n_states: int, n_actions: int, seed: int) -> np.ndarray:
    pi = np.random.default_rng(seed).random((n_states, n_actions)) + 0.05
    return pi / pi.sum(-1, keepdims=True)


def q_of_policy(P, R, pi, gamma: float) -> np.ndarray:
    """Q^pi, solving the linear Bellman equations Q = R + gamma P pi Q exactly."""
    S, A = R.shape
    M = np.eye(S * A) - gamma * np.einsum("sax,xb->saxb", P, pi).reshape(S * A, S * A)
    return np.linalg.solve(M, R.reshape(-1)).reshape(S, A)


def optimal_q(P, R, gamma: float, tol: float = 1e-13) -> np.ndarray:
    """Q* by value iteration to machine precision."""
    Q = np.zeros_like(R)
    while True:
        new = R + gamma * P @ Q.max(-1)
        if np.abs(new - Q).max() < tol:
            return new
        Q = new


def bitflip_mdp(n_bits: int, game_length: int = 5):
    """BitFlip(n) enumerated: state (t, bits) -> index t * 2^n + bits, t = 0..5,
    t = 5 terminal. Returns P, R, the start distribution, and the states."""
    nb = 2**n_bits
    S = (game_length + 1) * nb
    P = np.zeros((S, n_bits, S))
    R = np.zeros((S, n_bits))
    for t, b, a in itertools.product(range(game_length + 1), range(nb), range(n_bits)):
        s = t * nb + b
        if t == game_length:
            P[s, a, s] = 1.0  # absorbing, reward 0
            continue
        P[s, a, (t + 1) * nb + (b ^ (1 << a))] = 1.0
        R[s, a] = -1.0 if b >> a & 1 else 1.0
    # The env's start rule: uniform bits, then min(5, n) uniformly chosen positions zeroed.
    start = np.zeros(S)
    k = min(game_length, n_bits)
    for zeros in itertools.combinations(range(n_bits), k):
        mask = sum(1 << i for i in zeros)
        for b in range(nb):
            start[b & ~mask] += 1 / (math.comb(n_bits, k) * nb)
    return P, R, start


def policy_return(P, R, pi, start, gamma: float = 1.0, horizon: int = 5) -> float:
    """Expected return of pi from the start distribution over `horizon` steps."""
    d, total = start.copy(), 0.0
    for t in range(horizon):
        total += gamma**t * np.einsum("s,sa,sa->", d, pi, R)
        d = np.einsum("s,sa,sax->x", d, pi, P)
    return float(total)
