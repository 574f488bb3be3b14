"""qwr_atari.py: preprocessing, the single-frame replay buffer against the stacked observations it
replaces, the exact discrete actor loss, the sampled backups against their exact expectations, and
the wiring of the critic and actor steps and of evaluation (stub networks); its short runs: a smoke
run, resuming, its errors."""

import math
import re
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

import qwr_atari as qa
from helpers import record_env_actions

PONG = qa.Args(env_id="PongNoFrameskip-v4")


def test_preprocessing_gives_four_stacked_84x84_grey_uint8_frames():
    env = qa.make_env(replace(PONG, max_episode_steps=5))()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert all(np.array_equal(obs[0], f) for f in obs)  # padded with the reset frame
    steps = 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(0)
        steps += 1
        if terminated or truncated:
            break
    assert truncated and steps == 5  # the cap counts interactions, not frames
    env.close()


class FakeGames:
    """Two vector games in SAME_STEP autoreset mode whose frames are constant
    images numbered in order, ending (terminated or truncated) where told."""

    num_envs = 2
    single_action_space = gym.spaces.Discrete(3)

    def __init__(self, ends: dict):
        self.ends, self.t = ends, 0
        self.streams = [[] for _ in range(2)]
        self.first = [0, 0]
        self.counter = 0

    def _push(self, e, new_episode=False):
        self.counter += 1
        self.streams[e].append(self.counter)
        if new_episode:
            self.first[e] = len(self.streams[e]) - 1

    def _obs(self, e):
        last = len(self.streams[e]) - 1
        ids = [self.streams[e][max(i, self.first[e])] for i in range(last - 3, last + 1)]
        return np.stack([np.full((84, 84), v, dtype=np.uint8) for v in ids])

    def reset(self, seed=None):
        for e in range(2):
            self._push(e, new_episode=True)
        return np.stack([self._obs(e) for e in range(2)]), {}

    def step(self, actions):
        self.t += 1
        term, trunc = np.zeros(2, bool), np.zeros(2, bool)
        final = [None, None]
        for e in range(2):
            self._push(e)
            kind = self.ends.get((self.t, e))
            if kind:
                term[e], trunc[e] = kind == "terminated", kind == "truncated"
                final[e] = self._obs(e)
                self._push(e, new_episode=True)
        info = {}
        if (term | trunc).any():
            info = {"final_obs": final, "episode": {"r": np.zeros(2), "l": np.ones(2, int)}}
        self.last_true_next = [final[e] if final[e] is not None else self._obs(e) for e in range(2)]
        return np.stack([self._obs(e) for e in range(2)]), np.full(2, 5.0), term, trunc, info


def test_frame_buffer_rebuilds_every_stacked_observation_and_true_next_observation():
    games = FakeGames({(2, 0): "terminated", (5, 0): "truncated", (3, 1): "truncated", (4, 0): "terminated"})
    actor = qa.Actor(3, "mnih2013")
    buffer = qa.FrameReplayBuffer(capacity=20, num_envs=2, n_actions=3, device="cpu")
    obs, _ = games.reset()
    buffer.push_frames(obs[:, -1], np.arange(2), new_episode=True)
    seen, true_next = [], []
    for _ in range(9):  # one step at a time, to keep what the agent saw
        seen.append(obs)
        obs, _ = qa.collect(games, obs, 1, actor, buffer, "cpu")
        true_next.append(np.stack(games.last_true_next))
    d = buffer.data
    for row in range(9):
        for e in range(2):
            env = torch.tensor(e)
            s = buffer.stacks(d["frame"][row, e], d["first"][row, e], env, 0)
            s_next = buffer.stacks(d["frame"][row, e], d["first"][row, e], env, 1)
            assert np.array_equal(s.numpy(), seen[row][e]), (row, e)
            assert np.array_equal(s_next.numpy(), true_next[row][e]), (row, e)
    # mu is the policy at the state it acted in (a reset state after an episode end), next_mu at the true s'.
    with torch.no_grad():
        for row in range(9):
            assert torch.allclose(d["mu"][row], torch.softmax(actor(torch.as_tensor(seen[row])), -1), atol=1e-6)
            assert torch.allclose(d["next_mu"][row], torch.softmax(actor(torch.as_tensor(true_next[row])), -1),
                                  atol=1e-6)
    assert d["terminated"][:, 0].nonzero().flatten().tolist() == [1, 3]
    assert d["episode_end"][:, 1].nonzero().flatten().tolist() == [2]
    assert torch.all(d["reward"][:9] == 1.0)  # rewards of 5 stored clipped to 1


def test_exact_actor_loss_by_hand():
    mu = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[1.0, 2.0, 4.0]])
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    # V_mu = 0.5 + 0.6 + 0.8 = 1.9, A = (-0.9, 0.1, 2.1), normalised over the three.
    adv = [-0.9, 0.1, 2.1]
    m = sum(adv) / 3
    sd = math.sqrt(sum((a - m) ** 2 for a in adv) / 3)
    w = [math.exp((a - m) / (sd + 1e-5)) for a in adv]
    want = -(0.5 * w[0] * math.log(0.2) + 0.3 * w[1] * math.log(0.3) + 0.2 * w[2] * math.log(0.5))
    assert qa.exact_actor_loss(logits, mu, q, 1.0, 20.0).item() == pytest.approx(want, rel=1e-5)
    # beta -> 0: the best action's weight is clipped at 20, the others vanish.
    clipped = -(0.2 * 20.0 * math.log(0.5))
    assert qa.exact_actor_loss(logits, mu, q, 1e-4, 20.0).item() == pytest.approx(clipped, rel=1e-4)


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_sampled_backups_estimate_their_exact_expectations(kind):
    torch.manual_seed(0)
    mu = torch.tensor([0.1, 0.6, 0.3])
    q = torch.tensor([5.0, 1.0, 2.0])
    k, draws = 4, 200_000
    sampled = torch.multinomial(mu.expand(draws, 3), k, replacement=True)  # as critic_step samples
    estimate = qa.backup_values(q[sampled], kind, 0.3, "mad").mean().item()
    if kind == "mean":
        exact = (mu * q).sum().item()  # E over k draws of their mean
    else:  # the best of k draws, from order statistics: sorted by Q, P(max <= q_i) = F_i^k
        order = torch.argsort(q)
        cdf = torch.cumsum(mu[order], 0)
        p = cdf**k - torch.cat([torch.zeros(1), cdf[:-1]]) ** k
        exact = (p * q[order]).sum().item()
    assert estimate == pytest.approx(exact, abs=0.01)


def test_lse_backup_lies_between_mean_and_max_and_is_safe_at_zero_scale():
    q = torch.tensor([[0.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    lse = qa.backup_values(q, "lse", 0.3, "mad")
    assert torch.all(lse >= q.mean(-1) - 1e-6) and torch.all(lse <= q.amax(-1) + 1e-6)
    same = torch.full((2, 4), 2.0, requires_grad=True)
    out = qa.backup_values(same, "lse", 0.3, "mad")
    out.sum().backward()
    assert torch.equal(out, torch.full((2,), 2.0)) and torch.isfinite(same.grad).all()


# Wiring of critic_step and actor_step. The networks are stubs: a table of values per (state, action),
# where an "observation" is just the state's id (s = 0, s' = 1), so s and s' give other values. The batch is
# one transition s -> s' of one step. The optimisers record the gradient they are handed, from which the
# tests read what the update regressed on.


class TableNet(torch.nn.Module):
    """values[state id, action]: Q-values for a critic, logits for an actor."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor(values))
        self.out_scale = 1.0  # the critic's loss divides by it

    def forward(self, obs):
        return self.values[obs[..., 0].long()]


class RecordingOptimizer:
    """Keeps each step's gradient."""

    def __init__(self, param):
        self.param, self.grads = param, []

    def zero_grad(self, set_to_none=True):
        self.param.grad = None

    def step(self):
        self.grads.append(self.param.grad.clone())


def one_transition(mu, next_mu):
    """A batch of one step s -> s' (T = 1), with mu at s and at s' as given."""
    return dict(obs=torch.tensor([[0.0]]), next_obs=torch.tensor([[[1.0]]]), action=torch.tensor([[0]]),
                mu=torch.tensor([[mu]]), next_mu=torch.tensor([[next_mu]]), reward=torch.tensor([[1.0]]),
                terminated=torch.tensor([[False]]), last=torch.tensor([[True]]))


def test_critic_bootstraps_from_the_target_network_at_s_prime_with_actions_of_the_stored_mu_there():
    args = qa.Args(target_horizon=1, gamma=0.5, max_grad_norm=0.0)  # (the gradient unclipped, to read it)
    # Online Q(s, .) = (1, 2), Q(s', .) = (10, 20); target Q(s, .) = (3, 4), Q(s', .) = (30, 40). mu acted with
    # action 0 at s; mu at s' is sure of action 1, so all k samples are action 1 and any backup of them is
    # Q_target(s', 1) = 40: y = 1 + 0.5 * 40 = 21. (The online critic: 11; s for s': 3; mu at s, action 0: 16.)
    critic, target = TableNet([[1.0, 2.0], [10.0, 20.0]]), TableNet([[3.0, 4.0], [30.0, 40.0]])
    opt = RecordingOptimizer(critic.values)
    loss, q = qa.critic_step(args, one_transition(mu=[1.0, 0.0], next_mu=[0.0, 1.0]), critic, target, opt).tolist()
    assert (q, loss) == (1.0, (1.0 - 21.0) ** 2)
    # Only Q(s, a taken) is regressed: its gradient 2 (1 - 21); nothing flows into the other action or s'.
    assert opt.grads[0].tolist() == [[2 * (1.0 - 21.0), 0.0], [0.0, 0.0]]


def test_the_target_network_is_the_critic_copied_every_target_update_every_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copies, real_step = [], qa.critic_step

    def spy(args, b, critic, target, critic_opt):  # is the target the critic of this moment?
        copies.append(all(torch.equal(p, q) for p, q in zip(critic.parameters(), target.parameters())))
        return real_step(args, b, critic, target, critic_opt)

    monkeypatch.setattr(qa, "critic_step", spy)
    qa.train(tiny(total_timesteps=100, critic_steps=7, actor_steps=1, target_update_every=3, eval_episodes=0))
    assert copies == [True, False, False, True, False, False, True]


def test_actor_regresses_on_the_stored_mu_at_s_weighted_by_the_critic_at_s():
    args = qa.Args(max_grad_norm=0.0)
    # Q(s, .) = (0, 2); Q(s', .) = (2, 0) must not be used. The actor's logits at s are (0, 0):
    # pi = (.5, .5), far from the stored mu(s) = (.8, .2) (and from mu(s') = (.2, .8)).
    critic, actor = TableNet([[0.0, 2.0], [2.0, 0.0]]), TableNet([[0.0, 0.0], [0.0, 0.0]])
    opt = RecordingOptimizer(actor.values)
    qa.actor_step(args, one_transition(mu=[0.8, 0.2], next_mu=[0.2, 0.8]), actor, critic, opt)
    # V_mu(s) = .8 * 0 + .2 * 2 = .4, A = (-.4, 1.6), normalised over the two: (-1, 1), w = (1/e, e).
    # loss = -sum_a c_a log pi_a with c = mu w = (.8/e, .2 e); its gradient in the logits is
    # -(c_a - pi_a sum c) = -.5 (c_0 - c_1) for a = 0 and the opposite for a = 1:
    e = math.e
    g = -0.5 * (0.8 / e - 0.2 * e)  # = 0.1247
    assert opt.grads[0].tolist() == [pytest.approx([g, -g], rel=1e-4), [0.0, 0.0]]
    # The wrong wirings give other numbers: mu = pi (.5, .5): A = (-1, 1), -.5 (.5/e - .5 e) = 0.588;
    # mu(s'): -.5 (.2/e - .8 e) = 1.05; Q(s', .): A = (.4, -1.6), w = (e, 1/e), -.5 (.8 e - .2/e) = -1.05.


def test_the_gradient_norm_is_clipped_at_max_grad_norm():
    critic, target = TableNet([[1.0, 2.0], [10.0, 20.0]]), TableNet([[3.0, 4.0], [30.0, 40.0]])
    actor = TableNet([[0.0, 0.0], [0.0, 0.0]])
    batch = one_transition(mu=[0.8, 0.2], next_mu=[0.0, 1.0])
    # Unclipped, the critic's gradient is 2 (1 - 21) = -40 and the actor's 0.176 (as in the test above, times
    # sqrt 2 for its two entries); each is clipped to the flag's norm.
    for max_norm, critic_norm, actor_norm in ((0.0, 40.0, 0.1764), (0.5, 0.5, 0.1764), (0.05, 0.05, 0.05)):
        args = qa.Args(target_horizon=1, gamma=0.5, max_grad_norm=max_norm)
        critic_opt, actor_opt = RecordingOptimizer(critic.values), RecordingOptimizer(actor.values)
        qa.critic_step(args, batch, critic, target, critic_opt)
        qa.actor_step(args, batch, actor, critic, actor_opt)
        assert critic_opt.grads[0].norm().item() == pytest.approx(critic_norm, rel=1e-3)
        assert actor_opt.grads[0].norm().item() == pytest.approx(actor_norm, rel=1e-3)


def test_the_actors_baseline_is_v_mu_of_each_state():
    # Two states with the same Q (0, 2) and mu (.8, .2) and (.2, .8): V_mu = .4 and 1.6, so A = (-.4, 1.6) and
    # (-1.6, .4), normalised over the four entries. A plain mean over actions (1 in both) would give
    # A = (-1, 1) twice, and another loss.
    logits, q = torch.zeros(2, 2), torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    mu = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
    adv = np.array([[-0.4, 1.6], [-1.6, 0.4]])
    w = np.exp((adv - adv.mean()) / (adv.std() + 1e-5))
    want = -(mu.numpy() * w * np.log(0.5)).sum(-1).mean()
    assert qa.exact_actor_loss(logits, mu, q, 1.0, 20.0).item() == pytest.approx(want, rel=1e-5)
    plain = np.array([[-1.0, 1.0], [-1.0, 1.0]])
    assert abs(-(mu.numpy() * np.exp(plain / plain.std()) * np.log(0.5)).sum(-1).mean() - want) > 0.1


def tiny(**overrides) -> qa.Args:
    base = dict(env_id="PongNoFrameskip-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=3,
                actor_steps=3, batch_size=8, buffer_size=500, eval_every=2, eval_episodes=1,
                max_episode_steps=40, cuda=False)
    return qa.Args(**(base | overrides))


def test_compiled_updates_give_the_eager_losses():
    # Two critic and two actor steps from the same seed and the same batches (frames from a few steps
    # of Pong), eager and through torch.compile (--compile): what dynamo captures of the steps, with the
    # aot_eager backend (inductor's kernels take minutes to build on a 2-core CPU; tests/test_cuda.py
    # compares them with eager steps on a GPU).
    args = tiny(target_horizon=2, max_grad_norm=0.5, critic_head_init=1e-6)
    envs = qa.make_vec_env(args, 1)
    n = envs.single_action_space.n
    torch.manual_seed(0)
    buffer = qa.FrameReplayBuffer(100, 1, n, "cpu")
    obs, _ = envs.reset(seed=0)
    buffer.push_frames(obs[:, -1], np.arange(1), new_episode=True)
    qa.collect(envs, obs, 30, qa.Actor(n, args.torso), buffer, "cpu")
    envs.close()
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        actor, critic = qa.Actor(n, args.torso), qa.QNetwork(n, args)
        target = qa.copy.deepcopy(critic).requires_grad_(False)
        actor_opt, critic_opt = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
        critic_update = torch.compile(qa.critic_step, backend="aot_eager") if compiled else qa.critic_step
        actor_update = torch.compile(qa.actor_step, backend="aot_eager") if compiled else qa.actor_step
        torch.manual_seed(2)  # the same batches and sampled actions
        results.append(torch.cat([f(args, buffer.sample(4, s), *nets) for _ in range(2) for f, s, nets in (
            (critic_update, 2, (critic, target, critic_opt)), (actor_update, 1, (actor, critic, actor_opt)))]))
    assert results[1].tolist() == pytest.approx(results[0].tolist(), rel=1e-4, abs=1e-6)


def test_smoke_run_and_a_resumed_run_in_the_same_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = qa.train(tiny(save_model=True))
    assert m["global_step"] == 200 and all(math.isfinite(m[k]) for k in ("critic_loss", "actor_loss", "eval_return"))
    resumed = qa.train(tiny(total_timesteps=300, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == 300 and resumed["run_name"] == m["run_name"]
    assert math.isfinite(resumed["critic_loss"])


@pytest.mark.parametrize("env_id, message", [
    ("Hopper-v4", "needs an Atari (ALE) game, and Hopper-v4 is not one"),
    ("CartPole-v1", "needs an Atari (ALE) game"),
    ("NoSuchGame-v0", "cannot make env"),
])
def test_wrong_env_is_a_one_line_error(env_id, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        qa.train(tiny(env_id=env_id))


@pytest.mark.parametrize("tau", [1e-6, 1e6])
@pytest.mark.parametrize("scale", ["mad", "std", "none"])
def test_extreme_backup_temperatures_stay_finite(tau, scale):
    torch.manual_seed(0)
    q = torch.randn(64, 3, 4) * 1e3
    q[0] = 5.0  # a state whose sampled values are all equal
    out = qa.backup_values(q, "lse", tau, scale)
    assert torch.isfinite(out).all()
    assert (out <= q.amax(-1) + 1e-3).all() and (out >= q.mean(-1) - 1e-3).all()


@pytest.mark.parametrize("beta, max_weight", [(1e-3, 20.0), (1.0, 1e6), (1e-3, 1e6)])
def test_extreme_actor_weights_keep_the_loss_and_its_gradient_finite(beta, max_weight):
    torch.manual_seed(0)
    logits = (torch.randn(32, 6) * 30).requires_grad_()
    mu = torch.softmax(torch.randn(32, 6) * 5, -1)
    mu[:, 0] = 0.0  # an action the sampling policy never takes
    loss = qa.exact_actor_loss(logits, mu / mu.sum(-1, keepdim=True), torch.randn(32, 6) * 1e4, beta, max_weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_evaluation_is_greedy_or_samples_from_the_policy(monkeypatch):
    actions = record_env_actions(qa, monkeypatch)

    class Fixed(torch.nn.Module):  # logits that favour action 2 of Pong's 6; the others stay possible
        def forward(self, obs):
            return torch.log(torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])).expand(obs.shape[0], 6)

    args = replace(PONG, eval_episodes=2, max_episode_steps=30)
    returns = qa.evaluate(args, Fixed(), "cpu", greedy=True)
    greedy, actions[:] = np.concatenate(actions), []
    qa.evaluate(args, Fixed(), "cpu", greedy=False)
    sampled = np.concatenate(actions)
    assert (greedy == 2).all() and len(greedy) == 60 and returns.shape == (2,)
    assert 0.35 < (sampled == 2).mean() < 0.65 and len(set(sampled.tolist())) == 6
