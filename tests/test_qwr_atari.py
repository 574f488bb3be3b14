"""qwr_atari.py: preprocessing, the single-frame replay buffer against the
stacked observations it replaces, the exact discrete actor loss, the sampled
backups against their exact expectations, the wiring of the critic and actor
updates (stub networks), a smoke run and its errors, a run stopped inside an
iteration."""

import dataclasses
import math
import re
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import qwr_atari as qa
from checkpoints import assert_same_learning_state, run_whole


def test_preprocessing_gives_four_stacked_84x84_grey_uint8_frames():
    env = qa.make_env("PongNoFrameskip-v4", max_steps=5, noop_max=30)()
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
    sampled = torch.multinomial(mu.expand(draws, 3), k, replacement=True)  # as train_critic samples
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


# Wiring of train_critic and train_actor. The networks are stubs: a table of
# values per (state, action), where an "observation" is just the state's id
# (s = 0, s' = 1). The buffer always returns one transition s -> s' of one
# step. The optimisers record the gradient they are handed, from which the
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
    """Keeps each step's gradient, then adds `shift` to every table entry."""

    def __init__(self, param, shift=0.0):
        self.param, self.shift, self.grads = param, shift, []

    def zero_grad(self, set_to_none=True):
        self.param.grad = None

    def step(self):
        self.grads.append(self.param.grad.clone())
        with torch.no_grad():
            self.param += self.shift


class OneTransition:
    """A buffer of one step s -> s' (T = 1), with mu at s and at s' as given."""

    device = "cpu"

    def __init__(self, mu, next_mu):
        self.batch = dict(obs=torch.tensor([[0.0]]), next_obs=torch.tensor([[[1.0]]]), action=torch.tensor([[0]]),
                          mu=torch.tensor([[mu]]), next_mu=torch.tensor([[next_mu]]), reward=torch.tensor([[1.0]]),
                          terminated=torch.tensor([[False]]), last=torch.tensor([[True]]))

    def sample(self, batch_size, horizon):
        assert (batch_size, horizon) == (1, 1)
        return dict(self.batch)


def test_critic_bootstraps_from_the_target_copied_every_k_steps_with_mu_at_the_next_state():
    args = qa.Args(critic_steps=5, target_update_every=2, batch_size=1, target_horizon=1, gamma=0.5)
    # Q(s, .) = (1, 2), Q(s', .) = (10, 20); the optimiser adds 1 to every entry after each step,
    # so at step i the online critic is the table + i. The target starts as nonsense (-100).
    critic, target = TableNet([[1.0, 2.0], [10.0, 20.0]]), TableNet([[-100.0, -100.0], [-100.0, -100.0]])
    opt = RecordingOptimizer(critic.values, shift=1.0)
    # mu acted with action 0 at s; mu at s' is sure of action 1, so all k samples are action 1
    # and any backup F of them is Q_target(s', 1).
    qa.train_critic(args, OneTransition(mu=[1.0, 0.0], next_mu=[0.0, 1.0]), critic, target, opt)
    # Copies at steps 0, 2, 4: the target is the table + 0, 0, 2, 2, 4, so Q_target(s', 1) = 20, 20, 22, 22, 24
    # and y = 1 + 0.5 Q_target(s', 1) = 11, 11, 12, 12, 13. (From the online critic, 20 + i: 11, 11.5, 12, 12.5, 13.
    # From mu at s, action 0: 6, 6, 7, 7, 8. With no copy at step 0: -49.)
    # The loss is (Q(s, 0) - y)^2 with Q(s, 0) = 1 + i, so its gradient there is 2 (1 + i - y):
    want = [2 * (1 - 11), 2 * (2 - 11), 2 * (3 - 12), 2 * (4 - 12), 2 * (5 - 13)]
    assert [g[0, 0].item() for g in opt.grads] == want
    # Only Q(s, a taken) is regressed: nothing flows into the other action or into s'.
    assert all(torch.count_nonzero(g) == 1 for g in opt.grads)
    assert torch.equal(target.values, critic.values - 1)  # the last copy, at step 4, before its update


def test_actor_regresses_on_the_stored_mu_at_s_weighted_by_the_critic_at_s():
    args = qa.Args(actor_steps=1, batch_size=1)
    # Q(s, .) = (0, 2); Q(s', .) = (2, 0) must not be used. The actor's logits at s are (0, 0):
    # pi = (.5, .5), far from the stored mu(s) = (.8, .2) (and from mu(s') = (.2, .8)).
    critic, actor = TableNet([[0.0, 2.0], [2.0, 0.0]]), TableNet([[0.0, 0.0], [0.0, 0.0]])
    opt = RecordingOptimizer(actor.values)
    qa.train_actor(args, OneTransition(mu=[0.8, 0.2], next_mu=[0.2, 0.8]), actor, critic, opt)
    # V_mu(s) = .8 * 0 + .2 * 2 = .4, A = (-.4, 1.6), normalised over the two: (-1, 1), w = (1/e, e).
    # loss = -sum_a c_a log pi_a with c = mu w = (.8/e, .2 e); its gradient in the logits is
    # -(c_a - pi_a sum c) = -.5 (c_0 - c_1) for a = 0 and the opposite for a = 1:
    e = math.e
    g = -0.5 * (0.8 / e - 0.2 * e)  # = 0.1247
    assert opt.grads[0].tolist() == [pytest.approx([g, -g], rel=1e-4), [0.0, 0.0]]
    # The wrong wirings give other numbers: mu = pi (.5, .5): A = (-1, 1), -.5 (.5/e - .5 e) = 0.588;
    # mu(s'): -.5 (.2/e - .8 e) = 1.05; Q(s', .): A = (.4, -1.6), w = (e, 1/e), -.5 (.8 e - .2/e) = -1.05.


def tiny(**overrides) -> qa.Args:
    base = dict(env_id="PongNoFrameskip-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=3,
                actor_steps=3, batch_size=8, buffer_size=500, eval_every=2, eval_episodes=1,
                eval_episode_steps=50, train_episode_steps=40, cuda=False, compile=False)
    return qa.Args(**(base | overrides))


def test_compiled_updates_give_the_eager_losses():
    # Two critic and two actor steps from the same seed and the same batches (frames from a few steps
    # of Pong), eager and through torch.compile (the default, --compile). Compiled kernels sum float32
    # in another order, so the losses agree to rounding, not bit for bit (measured: relative 1e-6).
    args = tiny(critic_steps=2, actor_steps=2, target_update_every=1, batch_size=4, target_horizon=2)
    envs = qa.make_vec_env(args.env_id, 1, args.train_episode_steps, args.noop_max)
    torch.manual_seed(0)
    actor = qa.Actor(envs.single_action_space.n, args.torso)
    buffer = qa.FrameReplayBuffer(100, 1, envs.single_action_space.n, "cpu")
    obs, _ = envs.reset(seed=0)
    buffer.push_frames(obs[:, -1], np.arange(1), new_episode=True)
    qa.collect(envs, obs, 30, actor, buffer, "cpu")
    envs.close()
    results = []
    for compile_ in (False, True):
        torch.manual_seed(1)
        actor = qa.Actor(envs.single_action_space.n, args.torso)
        critic = qa.QNetwork(envs.single_action_space.n, args.torso, 100.0, args.critic_head)
        target = qa.copy.deepcopy(critic).requires_grad_(False)
        actor_opt, critic_opt = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
        critic_update = qa.compiled(qa.critic_step, dataclasses.replace(args, compile=compile_), torch.device("cpu"))
        actor_update = qa.compiled(qa.actor_step, dataclasses.replace(args, compile=compile_), torch.device("cpu"))
        assert (critic_update is qa.critic_step) != compile_
        torch.manual_seed(2)  # the same batches and sampled actions
        m = qa.train_critic(args, buffer, critic, target, critic_opt, critic_update)
        m |= qa.train_actor(args, buffer, actor, critic, actor_opt, actor_update)
        results.append(m)
    eager, fast = results
    for key in eager:
        assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


def test_smoke_run_checkpoint_resume_and_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = qa.train(tiny(save_model=True))
    assert m["global_step"] == 200 and all(math.isfinite(m[k]) for k in ("critic_loss", "actor_loss", "eval_return"))
    resumed = qa.train(tiny(total_timesteps=300, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == 300 and math.isfinite(resumed["critic_loss"])
    ev = qa.train(tiny(checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=2))
    assert len(ev["eval_returns"]) == 2


@pytest.mark.parametrize("env_id, message", [
    ("Hopper-v4", "needs a discrete action space"),
    ("CartPole-v1", "needs an Atari (ALE) game"),
    ("NoSuchGame-v0", "cannot make env"),
])
def test_wrong_env_is_a_usage_error(env_id, message):
    with pytest.raises(qa.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qa.train(tiny(env_id=env_id))


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = qa.train(tiny(total_timesteps=100, eval_every=1, save_model=True))["checkpoint"]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases = [("notes.pt", {}, "notes.pt is not a checkpoint (UnpicklingError"),
             (good, dict(env_id="BreakoutNoFrameskip-v4"), "was trained on PongNoFrameskip-v4, not Breakout"),
             (good, dict(torso="nature"), "its actor does not fit this run's"),
             (good, dict(buffer_size=1000), "resume with the checkpoint's --buffer-size")]
    for path, overrides, message in cases:
        with pytest.raises(qa.UsageError, match=re.escape(message)) as error:
            qa.train(tiny(checkpoint_path=str(path), **overrides))
        assert "\n" not in str(error.value)


def test_a_non_finite_loss_stops_the_run_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FloatingPointError, match=r"likely cause: --critic-lr 1e\+30"):
        qa.train(tiny(total_timesteps=100, critic_steps=20, critic_lr=1e30, eval_episodes=0))


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


@pytest.mark.parametrize("phase, after", [("critic", 3), ("actor", 2)])
def test_a_run_stopped_between_two_gradient_steps_goes_on_with_the_rest_of_its_iteration(phase, after, tmp_path,
                                                                                           monkeypatch):
    # As for qwr_continuous.py: stopped in the last of two iterations after `after` of its 6 critic (or
    # actor) steps and resumed, the run takes only the rest of them and ends with the networks, target and
    # optimisers of the run that was not stopped, bit for bit (CPU, eager); its logged losses agree to
    # rounding. The target is copied every 4 critic steps.
    args = tiny(critic_steps=6, actor_steps=6, target_update_every=4, save_model=True)
    monkeypatch.setattr(qa.Stop, "signal", None)
    whole, whole_ckpt = run_whole(qa.train, args, tmp_path, monkeypatch)
    real = {p: getattr(qa, f"{p}_step") for p in ("critic", "actor")}
    calls = {"critic": 0, "actor": 0}

    def counted(p):
        def step(*a, **k):
            calls[p] += 1
            if p == phase and calls[p] == 6 + after:  # a signal arrives during this step, in iteration 2
                qa.Stop.signal = signal.SIGINT
            return real[p](*a, **k)
        return step

    for p in calls:
        monkeypatch.setattr(qa, f"{p}_step", counted(p))
    with pytest.raises(SystemExit):
        qa.train(args)
    qa.Stop.signal = None
    path = next(Path("runs").glob("*/qwr_atari.pt")).resolve()
    assert torch.load(path, weights_only=False)["partial"][phase][0] == after
    with pytest.raises(qa.UsageError, match="resume it with --critic-steps 6 --actor-steps 6 --target-update-every 4"):
        qa.train(dataclasses.replace(args, checkpoint_path=str(path), actor_steps=7))
    calls.update(critic=0, actor=0)
    resumed = qa.train(dataclasses.replace(args, checkpoint_path=str(path)))
    assert calls == {"critic": 6 - after if phase == "critic" else 0, "actor": 6 - after if phase == "actor" else 6}
    for key in ("critic_loss", "actor_loss", "q_mean"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    resumed_ckpt = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_learning_state(whole_ckpt, resumed_ckpt)
