"""bitflip.py: the environment, the backups, and QWR's Theorems 1-3 checked on
small tabular problems solved exactly (qwr.md Sections 2.2-2.3, Appendix 6.2-6.3); the sweep of Fig. 1
(benchmarks/bitflip_sweep.py) and how run.py starts it."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import tyro
from tabular import bitflip_mdp, optimal_q, policy_return, q_of_policy, random_mdp, random_policy

import bitflip as bf
from benchmarks import bitflip_sweep, run

# ---------------------------------------------------------------- the environment


@pytest.mark.parametrize("n_bits", [1, 2, 5, 6, 20])
def test_start_states_and_observation_layout(n_bits):
    env = bf.BitFlip(n_bits, 2000, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (2000, n_bits + 1) and obs.dtype == np.float32
    bits, counter = obs[:, :n_bits], obs[:, n_bits]
    assert set(np.unique(bits)) <= {0.0, 1.0} and np.all(counter == 0)
    assert np.all((bits == 0).sum(1) >= min(5, n_bits))  # at least 5 zeros
    if n_bits == 20:  # and otherwise random: each bit is 1 in about 15/20 * 1/2 of games
        assert abs(bits.mean() - 0.375) < 0.02


def test_rewards_flips_and_termination_after_five_steps():
    env = bf.BitFlip(6, 3, seed=1)
    obs, _ = env.reset()
    actions = np.array([0, 3, 5])
    for t in range(1, 6):
        before = obs[np.arange(3), actions]
        obs, reward, terminated, truncated, _ = env.step(actions)
        assert np.array_equal(reward, np.where(before == 0, 1.0, -1.0))
        assert np.array_equal(obs[np.arange(3), actions], 1 - before)  # only that bit flipped
        assert np.all(obs[:, 6] == t) and not truncated.any()
        assert terminated.all() == (t == 5)
    # The same bit five times: +1 -1 +1 -1 +1 from a zero, -1 +1 -1 +1 -1 from a one.


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 5, 8, 30])
def test_flipping_zeros_first_reaches_the_optimal_return(n_bits):
    env = bf.BitFlip(n_bits, 50, seed=2)
    obs, _ = env.reset()
    total = np.zeros(50)
    for _ in range(5):  # flip the first zero bit; with none left, bit 0
        action = np.where((obs[:, :n_bits] == 0).any(1), (obs[:, :n_bits] == 0).argmax(1), 0)
        obs, reward, _, _, _ = env.step(action)
        total += reward
    assert np.all(total == bf.optimal_return(n_bits))
    # The exact optimum of the enumerated MDP agrees (Q* from the start states).
    if n_bits <= 6:
        P, R, start = bitflip_mdp(n_bits)
        v_star = start @ optimal_q(P, R, 1.0).max(-1)
        assert v_star == pytest.approx(bf.optimal_return(n_bits), abs=1e-9)


def test_enumerated_mdp_matches_the_environment():
    P, R, start = bitflip_mdp(4)
    env = bf.BitFlip(4, 1, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, _ = env.reset()
        for t in range(5):
            a = rng.integers(4)
            s = t * 16 + int(sum(int(b) << i for i, b in enumerate(obs[0, :4])))
            nxt, r, _, _, _ = env.step(np.array([a]))
            s2 = (t + 1) * 16 + int(sum(int(b) << i for i, b in enumerate(nxt[0, :4])))
            assert P[s, a, s2] == 1.0 and R[s, a] == r[0]
            obs = nxt
    assert start.sum() == pytest.approx(1.0) and start[0] == 1.0  # N = 4: all bits start at 0


# ---------------------------------------------------------------- backups


def test_backups_are_the_exact_expectations_under_mu():
    q = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    mu = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.4, 0.0]], dtype=torch.float64)
    assert bf.backup_values(q, mu, "mean", 0.3).tolist() == pytest.approx([0.5 - 0.5 + 1.0, 0.5])
    assert bf.backup_values(q, mu, "max", 0.3).tolist() == [4.0, 0.5]  # action 2 is not in mu's support
    lse = 0.5 * math.log(0.5 * math.exp(2) + 0.25 * math.exp(-4) + 0.25 * math.exp(8))
    assert bf.backup_values(q, mu, "lse", 0.5)[0].item() == pytest.approx(lse, abs=1e-12)
    # They are the limits of the sampled backups of the continuous script (k -> infinity).
    a = torch.multinomial(mu[0], 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    sampled = q[0, a]
    assert sampled.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (0.5 * torch.log(torch.exp(sampled / 0.5).mean())).item() == pytest.approx(lse, abs=0.02)


def test_backup_fixed_points_are_q_mu_and_q_star():
    P, R = random_mdp(6, 3, seed=0)
    mu = random_policy(6, 3, seed=1)
    gamma = 0.9

    def fixed_point(kind, tau=0.3):
        Q = np.zeros_like(R)
        for _ in range(600):
            F = bf.backup_values(torch.from_numpy(Q), torch.from_numpy(mu), kind, tau).numpy()
            Q = R + gamma * P @ F
        return Q

    q_mu, q_star = q_of_policy(P, R, mu, gamma), optimal_q(P, R, gamma)
    assert np.abs(fixed_point("mean") - q_mu).max() < 1e-10  # mean backup: policy evaluation of mu
    assert np.abs(fixed_point("max") - q_star).max() < 1e-10  # max backup (mu has full support): Q*
    assert np.abs(fixed_point("lse", 1e-3) - q_star).max() < 0.05  # lse interpolates between them
    assert np.abs(fixed_point("lse", 1e3) - q_mu).max() < 0.05
    mid = fixed_point("lse", 1.0)
    assert np.all(q_mu - 1e-9 <= mid) and np.all(mid <= q_star + 1e-9)


def test_episode_buffer_slices_stop_at_the_end_of_the_game():
    buf = bf.EpisodeBuffer(4, 3, "cpu")
    obs = torch.arange(5.0).reshape(1, 5, 1).expand(1, 5, 4)  # obs at step t is t
    buf.add(obs, torch.zeros(1, 5, dtype=torch.long), torch.arange(1.0, 6.0).reshape(1, 5), torch.full((1, 5, 3), 1 / 3))
    b = buf.sample(512, 3)
    t = b["obs"][:, 0].long()
    assert torch.equal(b["next_obs"][:, 0, 0], (t + 1).clamp(max=4).float())
    assert torch.equal(b["reward"][:, 0], t + 1.0)
    assert torch.equal(b["terminated"][:, 0], t == 4) and torch.equal(b["terminated"][:, 2], t >= 2)
    y = bf.td_lambda_targets(b["reward"], torch.zeros(512, 3), b["terminated"], b["terminated"], 1.0, 1.0)
    # lambda = 1, gamma = 1: the sum of the next 3 rewards, never past the 5th step.
    expected = torch.tensor([sum(float(r) for r in range(k + 1, min(k + 3, 5) + 1)) for k in t.tolist()])
    assert torch.equal(y, expected)


# ---------------------------------------------------------------- the actor losses


def test_actor_losses_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]], dtype=torch.float64))
    actions, weights = torch.tensor([0, 2]), torch.tensor([2.0, 0.5], dtype=torch.float64)
    awr = -(2.0 * math.log(0.5) + 0.5 * math.log(0.6)) / 2
    assert bf.awr_actor_loss(logits, actions, weights).item() == pytest.approx(awr, abs=1e-12)
    mu = torch.tensor([[1 / 3] * 3, [0.5, 0.5, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    qwr = -((math.log(0.5) + 2 * math.log(0.25) + 3 * math.log(0.25)) / 3 + 2 * math.log(0.2) + 2.5 * math.log(0.2)) / 2
    assert bf.qwr_actor_loss(logits, mu, w).item() == pytest.approx(qwr, abs=1e-12)


def minimise(loss_fn, params, steps=300):
    opt = torch.optim.LBFGS([params], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def test_theorem1_awr_clones_a_state_determines_action_buffer():
    """Appendix 6.2: whatever the weights, the AWR optimum takes the buffer's action."""
    rng = np.random.default_rng(0)
    n_states, n_actions = 12, 5
    actions = torch.from_numpy(rng.integers(0, n_actions, n_states))  # one action per state
    advantages = torch.from_numpy(rng.normal(size=n_states) * 3)  # many clearly negative
    weights = torch.exp(advantages)
    logits = minimise(lambda z: bf.awr_actor_loss(z, actions, weights), torch.zeros(n_states, n_actions,
                      dtype=torch.float64, requires_grad=True))
    cloned = torch.softmax(logits, -1)[torch.arange(n_states), actions]
    assert (cloned > 0.999).all()  # even where the buffer's action has advantage -6
    assert (advantages < -2).any()


def test_awr_improves_only_when_states_repeat():
    """With several actions per state, the AWR optimum is the xi-weighted empirical
    distribution pi(a|s) = sum_i xi_i [a_i = a] / sum_i xi_i, not a clone."""
    actions = torch.tensor([0, 1, 1, 2, 0, 2])
    weights = torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0, 0.5], dtype=torch.float64)
    states = torch.tensor([0, 0, 0, 0, 1, 1])
    logits = minimise(lambda z: bf.awr_actor_loss(z[states], actions, weights),
                      torch.zeros(2, 3, dtype=torch.float64, requires_grad=True))
    expected = torch.tensor([[1 / 6.5, 5 / 6.5, 0.5 / 6.5], [4 / 4.5, 0.0, 0.5 / 4.5]], dtype=torch.float64)
    assert torch.allclose(torch.softmax(logits, -1), expected, atol=1e-5)


def test_theorem2_gaussian_awr_goes_to_the_buffer_action_with_the_smallest_std():
    """Appendix 6.2.1: over Gaussians with sigma >= eps, the AWR optimum is
    mean = buffer action and sigma = eps, for any positive weights."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.uniform(-1, 1, 8))
    xi = torch.from_numpy(np.exp(rng.normal(size=8)))
    eps = 0.05

    def neg_objective(p):
        mean, sigma = p[:, 0], eps + torch.nn.functional.softplus(p[:, 1])
        return -(xi * torch.distributions.Normal(mean, sigma).log_prob(a)).mean()

    p = minimise(neg_objective, torch.zeros(8, 2, dtype=torch.float64, requires_grad=True), steps=2000)
    assert torch.allclose(p[:, 0], a, atol=1e-4)
    sigma = eps + torch.nn.functional.softplus(p[:, 1])
    assert torch.all(sigma < eps * 1.01)  # pushed to the bound: the density grows without limit


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_theorem3_qwr_optimum_is_mu_times_exp_advantage_over_beta(beta):
    """Appendix 6.3: with the true Q_mu, the QWR actor's optimum over tabular
    policies is pi*(a|s) proportional to mu(a|s) exp(A_mu(s, a) / beta)."""
    P, R = random_mdp(5, 4, seed=2)
    mu = random_policy(5, 4, seed=3)
    q = q_of_policy(P, R, mu, 0.9)
    adv = q - (mu * q).sum(-1, keepdims=True)
    xi = torch.from_numpy(np.exp(adv / beta))
    mu_t = torch.from_numpy(mu)
    logits = minimise(lambda z: bf.qwr_actor_loss(z, mu_t, xi), torch.zeros(5, 4, dtype=torch.float64,
                      requires_grad=True))
    closed_form = mu * np.exp(adv / beta)
    closed_form /= closed_form.sum(-1, keepdims=True)
    assert np.abs(torch.softmax(logits, -1).numpy() - closed_form).max() < 1e-6


def test_the_failure_numerically_on_bitflip():
    """On the exact BitFlip(6) MDP with a uniform mu and a state-determines-action
    buffer (one action drawn from mu per state), AWR's optimum (the clone) is on
    average no better than mu, while QWR's pi* improves on it (Theorems 1, 3)."""
    n = 6
    P, R, start = bitflip_mdp(n)
    S = len(start)
    mu = np.full((S, n), 1 / n)
    q = q_of_policy(P, R, mu, 0.999)
    v_mu = policy_return(P, R, mu, start)
    qwr_pi = mu * np.exp((q - (mu * q).sum(-1, keepdims=True)) / 1.0)
    qwr_pi /= qwr_pi.sum(-1, keepdims=True)
    v_qwr = policy_return(P, R, qwr_pi, start)
    rng = np.random.default_rng(0)
    clones = [policy_return(P, R, np.eye(n)[rng.integers(0, n, S)], start) for _ in range(400)]
    # Each state is visited once per game, so a clone replays mu: same expected return.
    assert abs(np.mean(clones) - v_mu) < 4 * np.std(clones) / np.sqrt(len(clones))
    assert v_qwr > v_mu + 1.0  # measured: 3.47 against 2.17 (and the best is 5)


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("algo", ["qwr", "awr"])
def test_both_learn_bitflip6_in_a_second(algo, monkeypatch, tmp_path):
    # BitFlip(6): the optimum is 5, the untrained policy scores about 1 greedy and 2.2 sampled
    # (measured with --actor-steps 0 on seeds 1-3); 600 interactions of training reach 4-5 and 3.8-4.2.
    monkeypatch.chdir(tmp_path)
    m = bf.train(bf.Args(algo=algo, n_bits=6, iterations=3, steps_per_iteration=200, critic_steps=50, actor_steps=50,
                         batch_size=64, hidden=64, eval_episodes=50))
    assert m["eval_return"] >= 3.5 and m["eval_return_sampled"] >= 3.0, m


def test_tiny_sweep_at_both_learning_rates_resumes_from_its_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    args = bitflip_sweep.Args(n_bits=(2, 7), seeds=1, lrs=("table4",), workers=1, out_dir=str(out),
                              run=bf.Args(iterations=1, steps_per_iteration=50, critic_steps=2, actor_steps=2,
                                          batch_size=8, hidden=8))
    rows = bitflip_sweep.sweep(args)
    assert len(rows) == 4 and (out / "bitflip_sweep.png").stat().st_size > 1000
    rows = bitflip_sweep.sweep(replace(args, lrs=("1e-2", "table4")))  # runs only the 1e-2 half
    lines = (out / "bitflip_sweep.csv").read_text().splitlines()
    assert lines[0].startswith("lrs,algo,n_bits,seed,eval_return,eval_return_sampled") and len(lines) == 9
    assert sorted(line.split(",")[0] for line in lines[1:]) == ["1e-2"] * 4 + ["table4"] * 4
    # No TensorBoard logs: run.py would copy them into results/runs/, where report.py reads the grids' runs.
    assert len(rows) == 8 and not (tmp_path / "runs").exists()


def test_run_py_starts_the_sweep_tool_with_flags_it_knows():
    (sweep,) = run.runs_of("bitflip", [1], None, None)
    assert sweep["script"] == "benchmarks/bitflip_sweep.py" and (run.ROOT / sweep["script"]).is_file()
    args = tyro.cli(bitflip_sweep.Args, args=[*sweep["args"], "--workers", "3"])  # launch() adds --workers
    assert (args.out_dir, args.workers, args.lrs) == ("bitflip", 3, ("1e-2", "table4"))  # report.py reads bitflip/


def test_bad_input_is_a_one_line_error():
    with pytest.raises(SystemExit, match="multiple of 5"):
        bf.train(bf.Args(steps_per_iteration=999))
    with pytest.raises(SystemExit, match="error: --n-bits must be >= 1"):
        bf.train(bf.Args(n_bits=0))


class TableNet(torch.nn.Module):
    """values[state id]: a stub network whose "observation" is the state's id (s = 0, s' = 1)."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor(values))

    def forward(self, obs):
        return self.values[obs[..., 0].long()]


def one_step(mu, next_mu, terminated=False):
    """A batch of one step s -> s' (T = 1) with action 0, reward 1, mu at s and at s' as given."""
    return dict(obs=torch.tensor([[0.0]]), action=torch.tensor([0]), mu=torch.tensor([mu]),
                reward=torch.tensor([[1.0]]), terminated=torch.tensor([[terminated]]),
                next_obs=torch.tensor([[[1.0]]]), next_mu=torch.tensor([[next_mu]]))


def test_the_critic_regresses_q_of_the_action_taken_on_the_target_networks_backup_at_s_prime_under_mu_there():
    args = bf.Args(algo="qwr", backup="mean", gamma=0.5, n_steps=1)
    # Online Q(s, .) = (1, 2), Q(s', .) = (10, 20); target Q(s, .) = (3, 4), Q(s', .) = (30, 40); mu at s' = (.25, .75):
    # y = 1 + .5 (.25 * 30 + .75 * 40) = 19.75. (Online: 1 + .5 * 17.5 = 9.75; mu at s (1, 0): 16; s for s': 2.875.)
    critic, target = TableNet([[1.0, 2.0], [10.0, 20.0]]), TableNet([[3.0, 4.0], [30.0, 40.0]])
    loss = bf.critic_loss_of(args, one_step(mu=[1.0, 0.0], next_mu=[0.25, 0.75]), critic, target)
    assert loss.item() == pytest.approx((1.0 - 19.75) ** 2)
    # AWR: V(s) = critic(s), y = 1 + .5 V_target(s') with V_target(s') = 30 (a one-output table).
    awr_args = bf.Args(algo="awr", gamma=0.5, n_steps=1)
    v, v_target = TableNet([[1.0], [10.0]]), TableNet([[3.0], [30.0]])
    assert bf.critic_loss_of(awr_args, one_step([1.0, 0.0], [0.25, 0.75]), v, v_target).item() == (1 - 16.0) ** 2
    # At the end of a game nothing is bootstrapped: y = r = 1.
    assert bf.critic_loss_of(args, one_step([1.0, 0.0], [0.25, 0.75], True), critic, target).item() == 0.0


def test_the_qwr_actor_weighs_every_action_by_mu_at_s_and_the_online_critics_advantage_at_s():
    args = bf.Args(algo="qwr", beta=1.0, max_weight=20.0)
    # Q(s, .) = (0, 2) online at s; the actor's logits at s are (0, 0). With mu(s) = (.8, .2): V_mu = .4,
    # A = (-.4, 1.6) normalised over the two: (-1, 1), w = (1/e, e); loss = -(.8/e ln .5 + .2 e ln .5).
    critic, actor = TableNet([[0.0, 2.0], [2.0, 0.0]]), TableNet([[0.0, 0.0], [0.0, 0.0]])
    loss = bf.actor_loss_of(args, one_step(mu=[0.8, 0.2], next_mu=[0.2, 0.8]), actor, critic).item()
    assert loss == pytest.approx(-(0.8 / math.e + 0.2 * math.e) * math.log(0.5), rel=1e-4)
    # The wrong wirings give other losses: mu at s' (.2, .8): -(.2/e + .8 e) ln .5; Q at s' (2, 0): -(.8 e + .2/e) ln .5.
    for wrong in (0.2 / math.e + 0.8 * math.e, 0.8 * math.e + 0.2 / math.e):
        assert abs(loss + wrong * math.log(0.5)) > 0.1
