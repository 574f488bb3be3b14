"""IQ / M-IQ: Theorem 1 of iq.md (IQ-DP is MD-VI) and its corollaries, exactly
on small random MDPs; the implicit Q-value of the multicategorical policy; the
loss of Eq. (2) on a hand-made batch; which networks, states and terms the
update uses (stub networks); extreme settings, finite or stopped loudly
(iq_continuous.py's runs and errors: test_scripts.py)."""

import copy
import math

import numpy as np
import pytest
import torch

import iq_continuous as iq
from tests.tabular import optimal_q, random_mdp, random_policy

GAMMA = 0.9


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True))).squeeze(-1)


def iq_dp_step(P, R, pi, V, alpha, tau):
    """One IQ-DP(alpha, tau) iteration, Eq. (3): the (pi', V') with
    tau ln pi' + V' = r + alpha tau ln pi + gamma P V and sum_a pi' = 1."""
    munchausen = alpha * tau * np.log(pi) if alpha else 0.0  # (0 * ln 0 would be NaN)
    B = R + munchausen + GAMMA * P @ V
    V_new = tau * logsumexp(B / tau)  # the only V' that makes pi' sum to 1
    return np.exp((B - V_new[:, None]) / tau), V_new


def md_vi_objective(pi, q, pi_old, alpha, tau):
    """<pi, q> + (1 - alpha) tau H(pi) - alpha tau KL(pi || pi_old), per state."""
    entropy = -(pi * np.log(pi)).sum(-1)
    kl = (pi * (np.log(pi) - np.log(pi_old))).sum(-1)
    return (pi * q).sum(-1) + (1 - alpha) * tau * entropy - alpha * tau * kl


def md_vi_step(P, R, pi, V, alpha, tau):
    """One step of value-based MD-VI(alpha tau, (1 - alpha) tau), Theorem 1:
    the regularised greedy policy, pi' proportional to pi^alpha exp(q / tau),
    and V' its regularised value."""
    q = R + GAMMA * P @ V
    logits = alpha * np.log(pi) + q / tau
    pi_new = np.exp(logits - logsumexp(logits)[:, None])
    return pi_new, md_vi_objective(pi_new, q, pi, alpha, tau)


@pytest.mark.parametrize("alpha, tau", [(0.0, 0.5), (0.9, 0.2), (0.5, 1.0), (0.99, 0.3), (1.0, 0.5)])
def test_theorem_1_iq_dp_and_md_vi_give_the_same_policies_and_values(alpha, tau):
    P, R = random_mdp(5, 3, seed=1)
    pi_iq = pi_md = random_policy(5, 3, seed=2)
    V_iq = V_md = np.random.default_rng(3).normal(size=5)
    for _ in range(40):  # (longer, and the KL-heavy cases drive probabilities below 1e-300)
        pi_iq, V_iq = iq_dp_step(P, R, pi_iq, V_iq, alpha, tau)
        pi_md, V_md = md_vi_step(P, R, pi_md, V_md, alpha, tau)
        np.testing.assert_allclose(pi_iq, pi_md, rtol=0, atol=1e-8)
        np.testing.assert_allclose(V_iq, V_md, rtol=0, atol=1e-8)


def test_md_vi_greedy_step_is_the_argmax_of_its_regularised_objective():
    P, R = random_mdp(4, 3, seed=4)
    pi_old, V = random_policy(4, 3, seed=5), np.random.default_rng(6).normal(size=4)
    alpha, tau = 0.7, 0.4
    pi_new, _ = md_vi_step(P, R, pi_old, V, alpha, tau)
    q = R + GAMMA * P @ V
    best = md_vi_objective(pi_new, q, pi_old, alpha, tau)
    rng = np.random.default_rng(7)
    for _ in range(200):  # no other policy on the simplex does better, state by state
        other = rng.dirichlet(np.ones(3), size=4)
        assert np.all(md_vi_objective(other, q, pi_old, alpha, tau) <= best + 1e-12)


def test_alpha_0_and_small_tau_recover_value_iteration():
    P, R = random_mdp(6, 4, seed=8)
    q_star = optimal_q(P, R, GAMMA)
    tau = 1e-6
    pi, V = random_policy(6, 4, seed=9), np.zeros(6)
    for _ in range(400):
        pi, V = iq_dp_step(P, R, pi, V, 0.0, tau)
    # Soft VI at temperature tau is within tau ln|A| / (1 - gamma) of V*.
    assert np.abs(V - q_star.max(-1)).max() <= tau * math.log(4) / (1 - GAMMA) + 1e-9
    assert np.array_equal(pi.argmax(-1), q_star.argmax(-1)) and pi.max(-1).min() > 0.999


@pytest.mark.parametrize("alpha, tau", [(0.0, 0.5), (0.5, 1.0), (0.9, 0.3)])
def test_md_vi_converges_to_the_optimal_policy_of_the_entropy_regularised_mdp(alpha, tau):
    P, R = random_mdp(5, 3, seed=10)
    t = (1 - alpha) * tau  # the entropy temperature that remains
    V_soft = np.zeros(5)
    for _ in range(2000):  # soft value iteration, V = t ln sum_a exp(q / t)
        V_soft = t * logsumexp((R + GAMMA * P @ V_soft) / t)
    q_soft = R + GAMMA * P @ V_soft
    pi_soft = np.exp((q_soft - V_soft[:, None]) / t)
    pi, V = random_policy(5, 3, seed=11), np.zeros(5)
    for _ in range(3000):
        pi, V = md_vi_step(P, R, pi, V, alpha, tau)
    np.testing.assert_allclose(pi, pi_soft, atol=1e-8)
    np.testing.assert_allclose(V, V_soft, atol=1e-8)


def test_implicit_q_of_the_multicategorical_policy_is_its_softmax_generator():
    torch.manual_seed(0)
    tau, n, d = 0.3, 3, 2
    policy = iq.MultiCategoricalPolicy(obs_dim=4, act_dim=d, n_bins=n).double()
    obs, v = torch.randn(4, dtype=torch.float64), 1.7
    joint = torch.cartesian_prod(torch.arange(n), torch.arange(n))  # all 9 joint actions
    q = iq.implicit_q(policy.log_prob(obs.expand(len(joint), 4), joint), v, tau)  # Eq. (1)
    pi = policy.log_probs(obs).exp()
    # pi(a|s) = softmax(Q(s, .) / tau) over the joint actions, and V = tau logsumexp(Q / tau) ...
    assert torch.allclose(torch.softmax(q / tau, 0), pi[0][joint[:, 0]] * pi[1][joint[:, 1]])
    assert torch.logsumexp(q / tau, 0).item() * tau == pytest.approx(v)
    # ... and per dimension: the marginals of softmax(Q / tau) are each dimension's softmax.
    marginal0 = torch.softmax(q / tau, 0).reshape(n, n).sum(1)
    assert torch.allclose(marginal0, pi[0])


def constant_policy(logits) -> iq.MultiCategoricalPolicy:
    """A one-dimensional policy whose logits ignore the state."""
    policy = iq.MultiCategoricalPolicy(obs_dim=1, act_dim=1, n_bins=len(logits))
    with torch.no_grad():
        policy.net[-1].weight.zero_()
        policy.net[-1].bias.copy_(torch.tensor(logits))
    return policy


def constant_value(v: float) -> torch.nn.Sequential:
    value = iq.mlp(1, 1)
    with torch.no_grad():
        value[-1].weight.zero_()
        value[-1].bias.fill_(v)
    return value


def networks(policy, value, target_policy, target_value) -> torch.nn.ModuleDict:
    """The four networks of an update, as make_networks returns them."""
    return torch.nn.ModuleDict(dict(policy=policy, value=value, target_policy=target_policy, target_value=target_value))


@pytest.mark.parametrize("tau", [0.5, 5.0])
def test_iq_loss_on_a_hand_made_batch(tau):
    # Online pi = (1/4, 1/2, 1/4), V = 1; target pi_bar = (3/5, 1/5, 1/5), V_bar = 2.
    policy, target_policy = constant_policy([0.0, math.log(2), 0.0]), constant_policy([math.log(3), 0.0, 0.0])
    nets = networks(policy, constant_value(1.0), target_policy, constant_value(2.0))
    batch = dict(obs=torch.zeros(2, 1), next_obs=torch.ones(2, 1), action=torch.tensor([[1], [0]]),
                 reward=torch.tensor([0.5, -1.0]), terminated=torch.tensor([False, True]))
    alpha, gamma = 0.9, 0.99
    munchausen = lambda p: max(tau * math.log(p), -1.0)  # clipped to [-1, 0]
    # Step 1: bin 1, continues: r + alpha clip(tau ln 1/5) + gamma V_bar - tau ln 1/2 - V.
    e1 = 0.5 + alpha * munchausen(0.2) + gamma * 2.0 - tau * math.log(0.5) - 1.0
    # Step 2: bin 0, terminated: no bootstrap.
    e2 = -1.0 + alpha * munchausen(0.6) - tau * math.log(0.25) - 1.0
    loss = iq.iq_loss(iq.Args(tau=tau, alpha=alpha, gamma=gamma, munchausen_clip=-1.0), nets, batch)
    assert loss.item() == pytest.approx((e1**2 + e2**2) / 2, rel=1e-6)
    if tau == 5.0:
        assert munchausen(0.2) == -1.0  # the clip is what this case checks


def test_munchausen_term_keeps_a_positive_log_density():
    # A Gaussian of std 0.1 at its mean has ln pi = -ln 0.1 - ln(2 pi) / 2 = 1.384 > 0 per dimension;
    # Eq. 2 uses it as it is (Munchausen-DQN's clip at 0 would make the term vanish).
    def gaussian(mean: float, std: float) -> iq.GaussianPolicy:
        policy = iq.GaussianPolicy(obs_dim=1, act_dim=1)
        with torch.no_grad():
            policy.net[-1].weight.zero_()
            policy.net[-1].bias.copy_(torch.tensor([mean, math.log(std)]))
        return policy

    nets = networks(gaussian(0.2, 0.5), constant_value(1.0), gaussian(0.0, 0.1), constant_value(2.0))
    batch = dict(obs=torch.zeros(1, 1), next_obs=torch.ones(1, 1), action=torch.zeros(1, 1),
                 reward=torch.tensor([0.5]), terminated=torch.tensor([False]))
    tau, alpha, gamma = 0.5, 0.9, 0.99
    log_density = lambda a, m, s: -((a - m) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
    assert log_density(0.0, 0.0, 0.1) > 0
    error = (0.5 + alpha * tau * log_density(0.0, 0.0, 0.1) + gamma * 2.0
             - tau * log_density(0.0, 0.2, 0.5) - 1.0)
    loss = iq.iq_loss(iq.Args(tau=tau, alpha=alpha, gamma=gamma, munchausen_clip=-1.0), nets, batch)
    assert loss.item() == pytest.approx(error**2, rel=1e-5)


class StubPolicy(torch.nn.Module):
    """ln pi(a|s) = c s_0 - a_0: which state it is asked about shows in the number."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def log_prob(self, obs, action):
        return self.c * obs[:, 0] - action[:, 0]


class StubValue(torch.nn.Module):
    """V(s) = c s_0, as a [B, 1] network output."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, obs):
        return self.c * obs[:, :1]


def test_the_update_regresses_on_the_target_networks_with_v_bar_at_s_prime_and_the_clipped_munchausen_term():
    # Online ln pi = -s_0 - a_0 and V = 10 s_0; target ln pi_bar = -2 s_0 - a_0 and V_bar = 100 s_0.
    nets = networks(StubPolicy(-1.0), StubValue(10.0), StubPolicy(-2.0), StubValue(100.0))
    s, s_next, a, r = [1.0, 4.0], [3.0, 2.0], 0.5, [0.5, -1.0]
    batch = dict(obs=torch.tensor(s)[:, None], next_obs=torch.tensor(s_next)[:, None], action=torch.full((2, 1), a),
                 reward=torch.tensor(r), terminated=torch.tensor([False, False]))
    args = iq.Args(tau=0.3, alpha=0.9, gamma=0.99, munchausen_clip=-1.0, polyak=0.005)
    # tau ln pi_bar(a|s): 0.3 (-2 - 0.5) = -0.75 at s = 1, kept; 0.3 (-8 - 0.5) = -2.55 at s = 4, clipped to -1.
    munchausen = [max(0.3 * (-2 * x - a), -1.0) for x in s]
    assert munchausen == pytest.approx([-0.75, -1.0])
    y = [r[i] + 0.9 * munchausen[i] + 0.99 * 100 * s_next[i] for i in range(2)]  # V_bar at s', from the target
    q = [0.3 * (-x - a) + 10 * x for x in s]  # the online pi and V at s (Eq. 1)
    expected = ((y[0] - q[0]) ** 2 + (y[1] - q[1]) ** 2) / 2
    optimizer = torch.optim.Adam([*nets.policy.parameters(), *nets.value.parameters()], lr=0.1)
    loss = iq.update_step(args, batch, nets, optimizer)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Wired otherwise the number is another: V_bar at s, the online V at s', ln pi_bar at s', no clip, no tau.
    wrong_y = {"V_bar(s)": [r[i] + 0.9 * munchausen[i] + 0.99 * 100 * s[i] for i in range(2)],
               "V(s')": [r[i] + 0.9 * munchausen[i] + 0.99 * 10 * s_next[i] for i in range(2)],
               "ln pi_bar(a|s')": [r[i] + 0.9 * max(0.3 * (-2 * s_next[i] - a), -1) + 0.99 * 100 * s_next[i]
                                   for i in range(2)],
               "no clip": [r[i] + 0.9 * 0.3 * (-2 * s[i] - a) + 0.99 * 100 * s_next[i] for i in range(2)],
               "alpha ln pi_bar": [r[i] + max(0.9 * (-2 * s[i] - a), -1) + 0.99 * 100 * s_next[i] for i in range(2)]}
    for wiring, wy in wrong_y.items():
        assert ((wy[0] - q[0]) ** 2 + (wy[1] - q[1]) ** 2) / 2 != pytest.approx(expected, rel=1e-3), wiring
    # The gradient step moved the online networks only; the targets followed by Polyak averaging.
    assert nets.value.c.item() != 10.0 and nets.target_value.c.item() == pytest.approx(
        100 + 0.005 * (nets.value.c.item() - 100))


def test_residual_target_sends_gradients_through_the_next_value():
    torch.manual_seed(1)
    policy, value = iq.MultiCategoricalPolicy(3, 2, 5), iq.mlp(3, 1)
    nets = networks(policy, value, copy.deepcopy(policy), copy.deepcopy(value))
    batch = dict(obs=torch.randn(8, 3), next_obs=torch.randn(8, 3), action=torch.randint(0, 5, (8, 2)),
                 reward=torch.randn(8), terminated=torch.zeros(8, dtype=torch.bool))
    grads = []
    for residual in (False, True):
        value.zero_grad()
        loss = iq.iq_loss(iq.Args(tau=0.01, alpha=0.9, gamma=0.99, munchausen_clip=-1.0, residual=residual),
                          nets, batch)
        loss.backward()
        grads.append((loss.item(), value[0].weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0])  # same loss: target = online here
    assert not torch.allclose(grads[0][1], grads[1][1])  # but a different gradient


def test_bin_centres_span_the_action_bounds():
    low, high = np.array([-1.0, -0.4]), np.array([1.0, 0.4])
    centres = iq.to_env_action(iq.Args(n_bins=11), torch.tensor([[0, 0], [5, 5], [10, 10]]), low, high)
    np.testing.assert_allclose(centres, [[-1.0, -0.4], [0.0, 0.0], [1.0, 0.4]])


# ------------------------------------------------------------ extreme settings: finite, or a loud stop


def filled_buffer(args, multicategorical: bool, scale: float = 1.0) -> iq.ReplayBuffer:
    """64 random transitions of a 3-dimensional state and a 2-dimensional action."""
    buf = iq.ReplayBuffer(64, 3, 2, torch.long if multicategorical else torch.float32, "cpu")
    for _ in range(64):
        buf.add(obs=torch.randn(3) * scale, next_obs=torch.randn(3) * scale, reward=torch.randn(()) * scale**2,
                action=torch.randint(0, args.n_bins, (2,)) if multicategorical else torch.rand(2) * 2 - 1,
                terminated=bool(torch.rand(()) < 0.1))
    return buf


@pytest.mark.parametrize("policy", ["multicategorical", "gaussian"])
@pytest.mark.parametrize("flags", [dict(tau=1e-6), dict(tau=1e6), dict(alpha=0.0), dict(alpha=1.0),
                                   dict(munchausen_clip=-math.inf),
                                   dict(tau=1e6, alpha=1.0, munchausen_clip=-math.inf)])
def test_extreme_settings_keep_every_loss_finite(policy, flags):
    torch.manual_seed(0)
    args = iq.Args(policy=policy, batch_size=16, **flags)
    nets = iq.make_networks(args, 3, 2)
    optimizer = torch.optim.Adam([*nets.policy.parameters(), *nets.value.parameters()], lr=args.learning_rate)
    multicategorical = policy == "multicategorical"
    with torch.no_grad():  # pi and pi_bar deem some actions all but impossible: their ln pi is about -1000
        for net in (nets.policy.net, nets.target_policy.net):
            if multicategorical:
                net[-1].bias.view(2, -1)[:, 0] = -1e3  # the first bin of each dimension
            else:
                net[-1].bias[2:] = -1e3  # the log-std (clamped to SAC's range, -5)
    buf = filled_buffer(args, multicategorical, scale=10.0)
    losses = torch.stack([iq.update_step(args, buf.sample(16), nets, optimizer) for _ in range(5)])
    assert torch.isfinite(losses).all(), losses


@pytest.mark.parametrize("policy", ["multicategorical", "gaussian"])
def test_a_non_finite_loss_stops_the_run(policy, tmp_path, monkeypatch):
    # Diverged after its first update, the policy goes on acting (NaN) until the window's loss check.
    monkeypatch.chdir(tmp_path)
    args = iq.Args(env_id="Hopper-v4", total_timesteps=120, learning_starts=100, eval_every=120, batch_size=32,
                   buffer_size=1000, eval_episodes=0, learning_rate=1e30, policy=policy, cuda=False)
    with pytest.raises(FloatingPointError, match=r"non-finite IQ loss at step 120"):
        iq.train(args)


@pytest.mark.parametrize("policy", ["multicategorical", "gaussian"])
def test_compiled_update_gives_the_eager_losses(policy):
    # Four gradient steps (and Polyak updates) from the same seed and batches, eager and through
    # torch.compile (--compile): what dynamo captures, with the aot_eager backend (inductor's kernels
    # take minutes to build on a 2-core CPU; tests/test_cuda.py compares them with eager steps on a GPU).
    args = iq.Args(policy=policy, batch_size=16)
    torch.manual_seed(0)
    buf = filled_buffer(args, policy == "multicategorical")
    losses = []
    for step in (iq.update_step, torch.compile(iq.update_step, backend="aot_eager")):
        torch.manual_seed(1)
        nets = iq.make_networks(args, 3, 2)
        optimizer = torch.optim.Adam([*nets.policy.parameters(), *nets.value.parameters()], lr=args.learning_rate)
        torch.manual_seed(2)  # the same batches
        losses.append(torch.stack([step(args, buf.sample(16), nets, optimizer) for _ in range(4)]))
    assert torch.allclose(losses[1], losses[0], rtol=1e-4, atol=1e-6), losses
