"""awr_continuous.py: TD(lambda) returns over stored trajectories, advantage
weights, the replay buffer's order, collection's true final observations, the
normaliser; extreme settings, finite or stopped loudly (its runs and errors: test_scripts.py)."""

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

import awr_continuous as awr

# Two episodes, oldest step first: A = steps 0-2, terminated at 2; B = steps 3-4,
# truncated by the time limit at 4. next_values[t] = V(s_{t+1}); 99 belongs to a
# terminal state and must never be used.
REWARDS = [1.0, 2.0, 3.0, 4.0, 5.0]
NEXT_VALUES = [20.0, 30.0, 99.0, 50.0, 60.0]
TERMINATED = [False, False, True, False, False]
CUT = [False, False, True, False, True]


def returns_of(gamma, lam):
    t = lambda x, dtype=torch.float64: torch.tensor(x, dtype=dtype)
    return awr.td_lambda_returns(t(REWARDS), t(NEXT_VALUES), t(TERMINATED, torch.bool), t(CUT, torch.bool),
                                 gamma, lam).tolist()


def test_td_lambda_returns_by_hand_with_a_termination_and_a_truncation():
    # gamma 0.9, lambda 0.5:
    #   R2 = 3 (terminated: no bootstrap)          R4 = 5 + 0.9 * 60 = 59 (truncated: bootstrap)
    #   R1 = 2 + 0.9 (0.5 * 30 + 0.5 * 3) = 16.85  R3 = 4 + 0.9 (0.5 * 50 + 0.5 * 59) = 53.05
    #   R0 = 1 + 0.9 (0.5 * 20 + 0.5 * 16.85) = 17.5825
    assert returns_of(0.9, 0.5) == pytest.approx([17.5825, 16.85, 3.0, 53.05, 59.0])


def test_lambda_zero_is_the_one_step_target_and_lambda_one_the_monte_carlo_return():
    assert returns_of(0.9, 0.0) == pytest.approx([1 + 18, 2 + 27, 3, 4 + 45, 5 + 54])
    # Discounted rewards to the episode's end, plus V of the final state after a truncation only.
    assert returns_of(0.9, 1.0) == pytest.approx([1 + 1.8 + 2.43, 2 + 2.7, 3, 4 + 4.5 + 0.81 * 60, 59])


def reference_returns(r, nv, term, cut, gamma, lam):
    """The authors' backward recursion, one step at a time."""
    out, nxt = np.zeros_like(r), None
    for t in reversed(range(len(r))):
        boot = 0.0 if term[t] else nv[t]
        out[t] = r[t] + gamma * (boot if cut[t] else (1 - lam) * boot + lam * nxt)
        nxt = out[t]
    return out


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1000])
def test_parallel_returns_equal_the_step_by_step_recursion(length):
    gen = np.random.default_rng(length)
    r, nv = (gen.normal(size=(length, 3)) for _ in range(2))
    term = gen.random((length, 3)) < 0.05
    cut = term | (gen.random((length, 3)) < 0.02)
    cut[-1] = True  # the newest step is always a cut
    got = awr.td_lambda_returns(*(torch.tensor(x) for x in (r, nv, term, cut)), 0.99, 0.95).numpy()
    for e in range(3):
        want = reference_returns(r[:, e], nv[:, e], term[:, e], cut[:, e], 0.99, 0.95)
        np.testing.assert_allclose(got[:, e], want, rtol=1e-10, atol=1e-10)


def test_advantage_weights_are_normalised_then_clipped_without_overflow():
    adv = torch.cat([torch.linspace(-1, 1, 99, dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64)])
    z = ((adv - adv.mean()) / (adv.std(correction=0) + 1e-5)).numpy()
    w = awr.advantage_weights(adv, beta=2.0, max_weight=20.0).numpy()
    np.testing.assert_allclose(w, np.minimum(np.exp(z / 2.0), 20.0), rtol=1e-12)
    assert w[-1] == pytest.approx(20.0) and z[-1] / 2 > math.log(20)  # the outlier is clipped
    assert np.isfinite(awr.advantage_weights(adv, beta=1e-6, max_weight=20.0).numpy()).all()
    # Normalisation makes the weights blind to the advantages' scale and shift.
    assert torch.allclose(awr.advantage_weights(3 * adv + 7, 1.0, 20.0), awr.advantage_weights(adv, 1.0, 20.0))


def test_action_bound_loss_penalises_only_means_outside_the_bounds():
    mean = torch.tensor([[0.5, 1.5], [-3.0, 0.0], [1.0, -1.0]])
    # Violations 0.5 and -2.0: 0.5 * mean(0.25, 4, 0) = 0.7083...
    assert awr.action_bound_loss(mean).item() == pytest.approx(0.5 * (0.25 + 4.0) / 3)


def test_buffer_is_read_oldest_first_and_cut_at_the_newest_step():
    buf = awr.ReplayBuffer(4, 1, 1, 1, "cpu")

    def add(rewards, ends):
        n = len(rewards)
        buf.add(dict(obs=torch.zeros(n, 1, 1), action=torch.zeros(n, 1, 1), next_obs=torch.zeros(n, 1, 1),
                     reward=torch.tensor(rewards).reshape(n, 1), terminated=torch.zeros(n, 1, dtype=torch.bool),
                     episode_end=torch.tensor(ends).reshape(n, 1)))

    add([1.0, 2.0], [False, True])
    d = buf.chronological()
    assert d["reward"][:, 0].tolist() == [1.0, 2.0] and d["cut"][:, 0].tolist() == [False, True]
    add([3.0, 4.0, 5.0], [False, False, False])  # wraps: rows hold 5, 2, 3, 4
    d = buf.chronological()
    assert d["reward"][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert d["cut"][:, 0].tolist() == [True, False, False, True]  # step 5's successor is not stored yet
    assert buf.data["episode_end"][:, 0].tolist() == [False, True, False, False]  # the cut is not stored


def test_obs_normalizer_matches_numpy_and_freezes_at_its_limit():
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm = awr.ObsNormalizer(3, 350)
    for chunk in x.split(100):
        norm.update(chunk)
    assert norm.count.item() == 350
    np.testing.assert_allclose(norm.mean.numpy(), x[:350].mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(norm.std.numpy(), x[:350].std(0, correction=0).numpy(), rtol=1e-5)
    constant = awr.ObsNormalizer(1, 100)
    constant.update(torch.full((10, 1), 3.0))
    assert torch.isfinite(constant(torch.full((1, 1), 3.0))).all()


def test_authors_per_env_settings():
    # (actor_stepsize, action_std) of every row of xbpeng/awr's awr_configs.py, read off that file.
    authors = {"Ant-v2": (5e-5, 0.2), "HalfCheetah-v2": (5e-5, 0.4), "Hopper-v2": (1e-4, 0.4),
               "Humanoid-v2": (1e-5, 0.4), "Walker2d-v2": (2.5e-5, 0.4)}
    for env_id, (lr, std) in authors.items():
        assert awr.authors_setting(env_id.replace("-v2", "-v4")) == dict(actor_lr=lr, action_std=std), env_id
    assert awr.authors_setting("Hopper-v5")["actor_lr"] == 1e-4
    assert awr.authors_setting("Pendulum-v1") == dict(actor_lr=5e-5, action_std=0.2)  # AWRAgent's defaults


class Ticker(gym.Env):
    """A scripted env whose observation counts: [1000 k + 100 episode + t] at
    step t of an episode, k the seed of its first reset (the vector env seeds
    env k with seed + k). Env 0 terminates at t = 3; the time limit of 4 steps
    truncates env 1's episodes. The reward is t."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, render_mode=None):
        self.k, self.episode, self.t = None, -1, 0

    def _obs(self):
        return np.array([1000 * self.k + 100 * self.episode + self.t], dtype=np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if self.k is None:
            self.k = seed
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(self.t), self.k == 0 and self.t == 3, False, {}


gym.register("tests/AwrTicker-v0", entry_point=Ticker, max_episode_steps=4)


def test_collect_stores_the_true_final_observation_at_episode_ends():
    envs = awr.make_vec_env("tests/AwrTicker-v0", 2)
    obs, _ = envs.reset(seed=0)
    rollout, last_obs, episodes = awr.collect(envs, obs, 10, awr.Actor(1, 1), awr.ObsNormalizer(1, 100), 0.4, "cpu")
    envs.close()
    s, s_next = rollout["obs"][..., 0].T.tolist(), rollout["next_obs"][..., 0].T.tolist()
    # Env 0 terminates after 3 steps: its final observations are 3, 103, 203, then a reset (100, 200, 300).
    assert s[0] == [0, 1, 2, 100, 101, 102, 200, 201, 202, 300]
    assert s_next[0] == [1, 2, 3, 101, 102, 103, 201, 202, 203, 301]  # not 100, 200, 300 (the resets)
    # Env 1 is truncated after 4 steps: 1004 and 1104 are the states a truncation bootstraps from.
    assert s[1] == [1000, 1001, 1002, 1003, 1100, 1101, 1102, 1103, 1200, 1201]
    assert s_next[1] == [1001, 1002, 1003, 1004, 1101, 1102, 1103, 1104, 1201, 1202]  # not 1100, 1200
    assert rollout["terminated"].T.nonzero().tolist() == [[0, 2], [0, 5], [0, 8]]
    assert rollout["episode_end"].T.nonzero().tolist() == [[0, 2], [0, 5], [0, 8], [1, 3], [1, 7]]
    assert rollout["reward"].T.tolist() == [[1, 2, 3] * 3 + [1], [1, 2, 3, 4] * 2 + [1, 2]]
    # Collection goes on from the reset states, and reports each ended episode (return, length).
    assert last_obs[:, 0].tolist() == [301, 1202]
    assert episodes == [(6.0, 3), (10.0, 4), (6.0, 3), (10.0, 4), (6.0, 3)]


# ------------------------------------------------------------ extreme settings: finite, or a loud stop


def updates_on_tiny_data(args: awr.Args, compile: bool = False) -> dict:
    """Five critic and five actor steps (compiled or not) on 64 random stored steps of large rewards, as
    train's loops take them; the mean losses and the largest advantage weight."""
    torch.manual_seed(0)
    buf = awr.ReplayBuffer(64, 1, 3, 2, "cpu")
    buf.add(dict(obs=torch.randn(64, 1, 3) * 10, next_obs=torch.randn(64, 1, 3) * 10, action=torch.randn(64, 1, 2),
                 reward=torch.randn(64, 1) * 100, terminated=torch.rand(64, 1) < 0.1,
                 episode_end=torch.rand(64, 1) < 0.2))
    args = replace(args, actor_lr=args.actor_lr or 5e-5, action_std=args.action_std or 0.4)
    actor, critic, norm = awr.Actor(3, 2), awr.Critic(3, args.gamma), awr.ObsNormalizer(3, 1000)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=args.actor_lr, momentum=args.momentum)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=args.critic_lr, momentum=args.momentum)
    norm.update(buf.data["obs"])
    critic_step = torch.compile(awr.critic_step, backend="aot_eager") if compile else awr.critic_step
    actor_step = torch.compile(awr.actor_step, backend="aot_eager") if compile else awr.actor_step
    states, _, _, returns = awr.buffer_returns(args, buf, critic, norm)
    rows = [torch.randint(0, len(states), (args.batch_size,)) for _ in range(5)]
    critic_loss = sum(critic_step(args, critic, critic_opt, norm, states[i], returns[i]) for i in rows) / 5
    states, actions, values, returns = awr.buffer_returns(args, buf, critic, norm)
    weights = awr.advantage_weights(returns - values, args.beta, args.max_weight)
    actor_loss = sum(actor_step(args, actor, actor_opt, norm, states[i], actions[i], weights[i]) for i in rows) / 5
    return dict(critic_loss=critic_loss.item(), actor_loss=actor_loss.item(), max_weight=weights.max().item())


def test_compiled_steps_give_the_eager_losses():
    # The same seed, data and batches, eager and through torch.compile (--compile): what dynamo captures
    # of the steps (graph breaks, the optimiser, the random draws), with the aot_eager backend, since
    # inductor's C++ kernels take minutes to build on a 2-core CPU (tests/test_cuda.py compares them
    # with eager steps on a GPU).
    eager = updates_on_tiny_data(awr.Args(batch_size=16))
    fast = updates_on_tiny_data(awr.Args(batch_size=16), compile=True)
    for key in eager:
        assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("flags", [dict(beta=1e-6), dict(max_weight=1e6), dict(gamma=0.9999), dict(critic_lr=1.0)])
def test_extreme_settings_keep_every_loss_finite(flags):
    metrics = updates_on_tiny_data(awr.Args(batch_size=16, **flags))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["max_weight"] <= max(20.0, flags.get("max_weight", 0)) * (1 + 1e-6)  # (the clip, in float32)


# Under SGD (the authors' optimiser) a step scales with the loss: weights of 1e6 (a tiny beta AND a huge
# clip) or log-likelihood gradients (a - mean) / std^2 of a tiny std make the policy diverge in a few steps.
@pytest.mark.parametrize("flags", [dict(beta=1e-6, max_weight=1e6), dict(action_std=1e-3), dict(critic_lr=1e30)])
def test_settings_that_diverge_stop_the_run(flags, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = awr.Args(env_id="Hopper-v4", total_timesteps=100, samples_per_iteration=100, critic_steps=8,
                    actor_steps=8, batch_size=32, buffer_size=1000, eval_episodes=0, cuda=False, **flags)
    with pytest.raises(FloatingPointError, match=r"non-finite losses at step 100"):
        awr.train(args)


def test_each_step_gets_a_batch_whose_states_returns_actions_and_weights_belong_together(tmp_path, monkeypatch):
    # train's loops draw one batch of buffer rows per step and hand the step those rows of every array.
    # Here the buffer's arrays are made so that row r is r everywhere: its state (r, ..., r), action r + 100,
    # return r / 2, value 0, so the weights are those of the returns.
    monkeypatch.chdir(tmp_path)
    states, actions = torch.arange(20.0)[:, None].expand(20, 11), torch.arange(20.0)[:, None] + 100
    returns = torch.arange(20.0) / 2
    monkeypatch.setattr(awr, "buffer_returns", lambda *a: (states, actions.expand(20, 3), torch.zeros(20), returns))
    weights, seen = awr.advantage_weights(returns, 1.0, 20.0), []

    def critic_step(args, critic, opt, norm, s, r):
        seen.append("critic")
        assert torch.equal(r, s[:, 0] / 2) and not torch.equal(s, states[: len(s)])
        return torch.zeros(1)

    def actor_step(args, actor, opt, norm, s, a, w):
        seen.append("actor")
        assert torch.equal(a[:, 0], s[:, 0] + 100) and torch.equal(w, weights[s[:, 0].long()])
        return torch.zeros(1)

    monkeypatch.setattr(awr, "critic_step", critic_step)
    monkeypatch.setattr(awr, "actor_step", actor_step)
    awr.train(awr.Args(env_id="Hopper-v4", total_timesteps=100, samples_per_iteration=100, critic_steps=3,
                       actor_steps=4, batch_size=8, buffer_size=1000, eval_episodes=0, cuda=False))
    assert seen == ["critic"] * 3 + ["actor"] * 4


def test_the_critic_regresses_on_returns_of_the_previous_v_and_the_actor_weighs_with_the_new_one(tmp_path,
                                                                                                 monkeypatch):
    # Alg. 1 and the authors' code: the TD(lambda) returns the critic regresses on are computed once, with the
    # V of the previous iteration, before its steps; the advantages are computed again after them, with the new V.
    monkeypatch.chdir(tmp_path)
    order, real_returns, real_critic, real_actor = [], awr.buffer_returns, awr.critic_step, awr.actor_step

    def returns(args, buffer, critic, obs_norm):
        order.append(("returns", critic.net[-1].bias.item()))
        return real_returns(args, buffer, critic, obs_norm)

    def critic_step(args, critic, *rest):
        order.append("critic")
        with torch.no_grad():
            critic.net[-1].bias += 1.0  # each step moves V, so the returns show which V they were made with
        return real_critic(args, critic, *rest)

    monkeypatch.setattr(awr, "buffer_returns", returns)
    monkeypatch.setattr(awr, "critic_step", critic_step)
    monkeypatch.setattr(awr, "actor_step", lambda *a: order.append("actor") or real_actor(*a))
    awr.train(awr.Args(env_id="Hopper-v4", total_timesteps=100, samples_per_iteration=100, critic_steps=2,
                       actor_steps=2, batch_size=8, buffer_size=1000, critic_lr=0.0, eval_episodes=0, cuda=False))
    assert order == [("returns", 0.0), "critic", "critic", ("returns", 2.0), "actor", "actor"]
