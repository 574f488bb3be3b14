"""qwr_continuous.py's replay buffer, data collection and normaliser: episode
boundaries and the stored sampling policy; a run stopped inside an iteration (its runs
and errors: test_scripts.py)."""

import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import qwr_continuous as qwr
from checkpoints import assert_same_learning_state, run_whole


def rollout_of(rewards, terminated, truncated, obs_dim=1, act_dim=1):
    """A one-env rollout whose observation at step t is [t] and next one [t + 0.5]."""
    n = len(rewards)
    col = lambda x, dtype=torch.float32: torch.tensor(x, dtype=dtype).reshape(n, 1)
    steps = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1)
    return dict(
        obs=steps.expand(n, 1, obs_dim), next_obs=(steps + 0.5).expand(n, 1, obs_dim),
        action=torch.zeros(n, 1, act_dim), mu_mean=torch.zeros(n, 1, act_dim),
        mu_std=torch.full((n, 1, act_dim), 0.4), next_mu_mean=torch.zeros(n, 1, act_dim),
        reward=col(rewards), terminated=col(terminated, torch.bool),
        episode_end=col(np.logical_or(terminated, truncated), torch.bool),
    )


def test_buffer_slices_stop_at_episode_ends_and_at_the_newest_step():
    buf = qwr.ReplayBuffer(8, 1, 1, 1, "cpu")
    # Episode A: steps 0-2, truncated at 2. Episode B: steps 3-4, terminated at 4. C: 5, running.
    buf.add(rollout_of([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]))
    start = lambda *rows: torch.tensor(rows)
    s = buf.gather(start(1, 3, 5), torch.zeros(3, dtype=torch.long), 3)
    # Row 5 is the newest step stored, so the second slice is also cut there.
    assert s["last"].tolist() == [[False, True, False], [False, True, True], [True, False, False]]
    assert s["terminated"].tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    # After the truncation the slice bootstraps from A's final observation, 2.5, not B's start.
    assert s["next_obs"][0, 1, 0].item() == 2.5 and s["reward"][0, :2].tolist() == [2.0, 3.0]
    # Through the network-free target: rewards 2, 3 then bootstrap 1 at A's final state.
    y = qwr.td_lambda_targets(s["reward"], torch.ones(3, 3), s["terminated"], s["last"], 0.9, 0.5)
    assert y[0].item() == pytest.approx(0.5 * (2 + 0.9) + 0.5 * (2 + 0.9 * 3 + 0.81), abs=1e-6)
    assert y[2].item() == pytest.approx(6 + 0.9, abs=1e-6)  # newest step: 1-step target


def test_buffer_wraps_around_without_reading_old_data_as_a_continuation():
    buf = qwr.ReplayBuffer(4, 1, 1, 1, "cpu")
    buf.add(rollout_of([1, 2, 3], [0, 0, 0], [0, 0, 0]))
    buf.add(rollout_of([4, 5, 6], [0, 0, 0], [0, 0, 0]))  # rows 3, 0, 1; ptr = 2
    assert (buf.ptr, buf.size) == (2, 4)
    assert buf.data["reward"][:, 0].tolist() == [5.0, 6.0, 3.0, 4.0]
    s = buf.gather(torch.tensor([1, 3]), torch.zeros(2, dtype=torch.long), 3)
    assert s["last"][0, 0].item()  # row 1 holds the newest step: row 2 is older data
    assert s["reward"][1].tolist() == [4.0, 5.0, 6.0] and not s["last"][1, :2].any()
    rows = buf.sample(4096, 1)["reward"][:, 0]
    assert set(rows.tolist()) == {3.0, 4.0, 5.0, 6.0}


def test_collect_stores_true_final_observations_and_mu_at_the_next_state():
    envs = qwr.make_vec_env("Hopper-v4", 2)
    obs, _ = envs.reset(seed=0)
    torch.manual_seed(0)
    actor, norm = qwr.Actor(11, 3), qwr.ObsNormalizer(11, 10_000)
    with torch.no_grad():
        actor.net[-1].weight.normal_(0, 3.0)  # a wild policy: Hopper falls within 100 steps
    rollout, last_obs, episodes = qwr.collect(envs, obs, 100, actor, norm, 0.4, "cpu")
    envs.close()
    ends = rollout["episode_end"]
    assert rollout["obs"].shape == (100, 2, 11) and ends.any() and len(episodes) == int(ends.sum())
    for e in range(2):
        for step in range(99):
            same = torch.equal(rollout["next_obs"][step, e], rollout["obs"][step + 1, e])
            # The step after an episode end starts from a reset: a different state.
            assert same != bool(ends[step, e]), (step, e)
    assert np.array_equal(last_obs.astype(np.float32), rollout["next_obs"][-1].numpy()) or ends[-1].any()
    with torch.no_grad():  # (batched and per-step matmuls round differently)
        assert torch.allclose(rollout["next_mu_mean"], actor(norm(rollout["next_obs"])), atol=1e-4)
        assert torch.allclose(rollout["mu_mean"], actor(norm(rollout["obs"])), atol=1e-4)
    # Sampled actions are stored unclipped: mu's density is defined for them.
    assert (rollout["action"].abs() > 1).any() and torch.all(rollout["mu_std"] == 0.4)


def test_obs_normalizer_matches_numpy_and_freezes_at_its_limit():
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm = qwr.ObsNormalizer(3, 350).double()
    for chunk in x.split(100):
        norm.update(chunk)
    assert norm.count.item() == 350
    assert torch.allclose(norm.mean, x[:350].mean(0)) and torch.allclose(norm.var, x[:350].var(0, correction=0))


@pytest.mark.parametrize("clip, expected", [(0.0, 1e5), (10.0, 10.0)])
def test_obs_clip_reaches_the_learners_normalizer(clip, expected):
    # A dimension that was 0 in every observation so far (std 0) and then moves by 1: the authors'
    # normaliser turns it into 1 / 1e-5; --obs-clip bounds it.
    box = qwr.gym.spaces.Box(-1.0, 1.0, (1,))
    norm = qwr.make_learner(qwr.Args(obs_clip=clip), 2, box, "cpu", 100).obs_norm
    norm.update(torch.zeros(50, 2))
    out = norm(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[expected, -expected], [0.0, 0.0]]), rtol=1e-4)


# ------------------------------------------------------------ the two update steps, wired to stub networks


class LinearQ(torch.nn.Module):
    """Q(s, a) = w * sum(a), in return units; the real critic's output scale is 10 here.
    Unlike the real critic, it does not clip its action input."""

    out_scale = 10.0

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, obs, actions):
        return self.w * actions.sum(-1)


class AddOne:
    """An 'optimiser' whose step adds 1 to a network's w: the online critic is w = 1, 2, 3, ... at steps 0, 1, 2."""

    def __init__(self, net):
        self.net = net

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        with torch.no_grad():
            self.net.w += 1


def stored_steps(n, action, mu_mean, mu_std, next_mu_mean, reward=1.0):
    """A one-env buffer of n identical, non-terminal steps."""
    buf = qwr.ReplayBuffer(n, 1, 1, 1, "cpu")
    full = lambda v: torch.full((n, 1, 1), float(v))
    buf.add(dict(obs=full(0), next_obs=full(0), action=full(action), mu_mean=full(mu_mean), mu_std=full(mu_std),
                 next_mu_mean=full(next_mu_mean), reward=torch.full((n, 1), reward),
                 terminated=torch.zeros(n, 1, dtype=torch.bool), episode_end=torch.zeros(n, 1, dtype=torch.bool)))
    return buf


def test_critic_bootstraps_from_the_target_network_at_mu_of_the_next_state():
    # mu at s is centred on -5, mu at s' on +5 (std ~0): every a' ~ mu(.|s') is +5. The stored action is 3.
    # 1-step targets, mean backup, gamma 0.5, reward 1.
    buf = stored_steps(8, action=3.0, mu_mean=-5.0, mu_std=1e-6, next_mu_mean=5.0)
    args = qwr.Args(critic_steps=3, target_update_every=2, batch_size=4, target_horizon=1, backup="mean", gamma=0.5)
    critic = LinearQ(1.0)
    target = LinearQ(-100.0)  # whatever it holds, it is a copy of the critic from step 0 on
    metrics = qwr.train_critic(args, buf, critic, target, AddOne(critic), qwr.ObsNormalizer(1, 0))
    # Online w = 1, 2, 3 at steps 0, 1, 2; the target copies it at steps 0 and 2: w_bar = 1, 1, 3.
    q = [1.0 * 3, 2.0 * 3, 3.0 * 3]  # Q(s, 3) = 3 w
    y = [1 + 0.5 * 1 * 5, 1 + 0.5 * 1 * 5, 1 + 0.5 * 3 * 5]  # r + gamma * w_bar * 5
    assert metrics["q_mean"] == pytest.approx(np.mean(q))
    assert metrics["target_mean"] == pytest.approx(np.mean(y), rel=1e-5)  # online net: y = 3.5, 6, 8.5
    # The loss is in the network's own units, (q - y) / out_scale, not in returns.
    assert metrics["critic_loss"] == pytest.approx(np.mean([((a - b) / 10) ** 2 for a, b in zip(q, y)]), rel=1e-4)
    assert target.w.item() == 3.0


class IndexQ(torch.nn.Module):
    """Q(s, a_j) = j for the j-th of the k sampled actions, whatever they are; bounds [-1, 1]."""

    low, high = torch.tensor([-1.0]), torch.tensor([1.0])

    def forward(self, obs, actions):
        return torch.arange(actions.shape[-2], dtype=torch.float32).expand(actions.shape[:-1])


class ConstantActor(torch.nn.Module):
    def __init__(self, mean: float):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.tensor([mean]))

    def forward(self, obs):
        return self.mean.expand(obs.shape[:-1] + (1,))


def test_actor_regresses_on_unclipped_actions_of_the_stored_mu_weighted_by_advantage():
    # The stored mu is centred on 1.5, beyond the bound 1 (std 0: every sampled action is 1.5);
    # the current policy's mean is 0.2. The actor's std is 0.4.
    buf = stored_steps(8, action=0.0, mu_mean=1.5, mu_std=0.0, next_mu_mean=0.0)
    args = qwr.Args(actor_steps=1, batch_size=4, n_samples=4, beta=1.0, max_weight=20.0, action_std=0.4)
    actor = ConstantActor(0.2)
    optimiser = torch.optim.SGD(actor.parameters(), lr=0.0)
    metrics = qwr.train_actor(args, buf, actor, IndexQ(), optimiser, qwr.ObsNormalizer(1, 0))
    # Q = 0, 1, 2, 3 -> A = -1.5, -0.5, 0.5, 1.5; over the batch mean 0, std sqrt(1.25): w = exp(A / 1.118).
    w = np.exp(np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25))
    log_prob = -((1.5 - 0.2) ** 2) / (2 * 0.4**2) - np.log(0.4) - 0.5 * np.log(2 * np.pi)  # at 1.5, not at 1
    assert metrics["actor_loss"] == pytest.approx(-w.mean() * log_prob, rel=1e-4)
    assert metrics["clipped_weight_fraction"] == 0.0 and metrics["mean_at_bound_fraction"] == 0.0


@pytest.mark.parametrize("clip", [False, True])
def test_the_critic_sees_the_sampled_action_or_with_the_flag_the_executed_one(clip):
    torch.manual_seed(0)
    box = qwr.gym.spaces.Box(np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    critic = qwr.make_learner(qwr.Args(critic_clips_actions=clip), 3, box, "cpu", 100).critic
    q = critic(torch.randn(3), torch.tensor([[3.0, -2.0], [1.0, -0.5], [0.2, 0.1]]))
    # (3, -2) is executed as (1, -0.5); the authors' critic (no flag) tells the two apart.
    assert (abs(q[0].item() - q[1].item()) < 1e-5) == clip
    assert abs(q[1].item() - q[2].item()) > 1e-3


def test_a_bf16_layer_multiplies_bf16_rounded_inputs_with_float32_sums():
    torch.manual_seed(0)
    layer, x = qwr.Linear(64, 8), torch.randn(16, 64)
    exact = layer(x)
    layer.bf16 = True
    fast = layer(x)
    # The sum of the rounded inputs' products (in float64 here), then one rounding to bfloat16.
    w, b = layer.weight.bfloat16().double(), layer.bias.bfloat16().double()
    assert fast.dtype == torch.bfloat16
    assert torch.allclose(fast.double(), x.bfloat16().double() @ w.T + b, rtol=2**-8, atol=1e-6)
    assert (fast.float() - exact).abs().max() > 1e-3  # unrounded inputs would be this far off


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_matmuls_reach_every_hidden_layer_and_no_output_layer(bf16):
    torch.manual_seed(0)
    args, box, obs = qwr.Args(bf16_matmuls=bf16), qwr.gym.spaces.Box(-1, 1, (2,)), torch.randn(4, 3)
    learner = qwr.make_learner(args, 3, box, "cpu", 100)
    for net in (learner.actor, learner.critic, learner.target):
        layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        assert all(m.bf16 == bf16 for m in layers[:-1]) and len(layers) == (3 if net is learner.actor else 6)
        assert isinstance(layers[-1], qwr.OutputLinear)
    # The output layers multiply in float32, also from bfloat16 activations.
    h = torch.randn(4, 256).bfloat16()
    for out in (learner.critic.head[-1], learner.actor.net[-1]):
        assert torch.equal(out(h), torch.nn.functional.linear(h.float(), out.weight, out.bias))
    # Q comes out in float32, near the float32 network's value.
    actions, exact = torch.randn(4, 5, 2), qwr.make_learner(qwr.Args(), 3, box, "cpu", 100).critic
    exact.load_state_dict(learner.critic.state_dict())
    q, q_exact = learner.critic(obs, actions), exact(obs, actions)
    assert q.dtype == learner.actor(obs).dtype == torch.float32
    # Five layers of bfloat16 activations: within a few roundings (measured: 1.1% of the largest |Q|).
    assert (q - q_exact).abs().max() <= 0.03 * q_exact.abs().max() and torch.equal(q, q_exact) != bf16


def test_sampled_actions_come_from_each_state_s_own_gaussian():
    torch.manual_seed(0)
    mean, std = torch.tensor([[0.0, 10.0], [-5.0, 1.0]]), torch.tensor([[1.0, 0.1], [0.5, 2.0]])
    a = qwr.sample_actions(mean, std, 20_000)
    assert a.shape == (2, 20_000, 2)
    assert torch.allclose(a.mean(1), mean, atol=0.05) and torch.allclose(a.std(1), std, rtol=0.03)


@pytest.mark.parametrize("flags", [dict(tau=tau, backup_scale=scale) for tau in (1e-6, 1e6)
                                   for scale in ("mad", "std", "none")]
                         + [dict(beta=1e-3), dict(max_weight=1e6), dict(beta=1e-3, max_weight=1e6)])
def test_extreme_settings_keep_every_loss_finite(flags):
    torch.manual_seed(0)
    args = qwr.Args(critic_steps=5, actor_steps=5, batch_size=16, **flags)
    buf = qwr.ReplayBuffer(64, 1, 3, 2, "cpu")
    buf.add(dict(obs=torch.randn(64, 1, 3) * 10, next_obs=torch.randn(64, 1, 3) * 10, action=torch.randn(64, 1, 2),
                 mu_mean=torch.randn(64, 1, 2), mu_std=torch.full((64, 1, 2), 0.4), next_mu_mean=torch.randn(64, 1, 2),
                 reward=torch.randn(64, 1) * 100, terminated=torch.rand(64, 1) < 0.1,
                 episode_end=torch.rand(64, 1) < 0.2))
    learner = qwr.make_learner(args, 3, qwr.gym.spaces.Box(-1, 1, (2,)), "cpu", 1000)
    metrics = qwr.train_critic(args, buf, learner.critic, learner.target, learner.critic_opt, learner.obs_norm)
    metrics |= qwr.train_actor(args, buf, learner.actor, learner.critic, learner.actor_opt, learner.obs_norm)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    # The backup stays between the mean and the max of the sampled values, whatever the temperature.
    q = torch.randn(64, 3, 4) * 1e3
    q[0] = 5.0  # a state whose sampled values are all equal
    out = qwr.backup_values(q, args.backup, args.tau, args.backup_scale)
    assert (out <= q.amax(-1) + 1e-3).all() and (out >= q.mean(-1) - 1e-3).all()


def test_a_non_finite_loss_stops_the_run_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = qwr.Args(env_id="Hopper-v4", total_timesteps=100, steps_per_iteration=100, critic_steps=20, actor_steps=2,
                    batch_size=32, eval_episodes=0, critic_lr=1e30, cuda=False, compile=False)
    with pytest.raises(FloatingPointError, match=r"non-finite losses at step 100 .*likely cause: --critic-lr 1e\+30"):
        qwr.train(args)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_updates_give_the_eager_losses(bf16):
    # Three critic and three actor steps from the same seed and the same batches, eager and through
    # torch.compile (the default, --compile). The kernels differ (fused, reordered float32 sums), so the
    # numbers agree to float32 rounding (measured: relative differences below 1e-5), not bit for bit.
    # With --bf16-matmuls, eager code and the compiled kernels round to bfloat16 in other places (a fused
    # kernel may keep float32 between two operations), so they agree to bfloat16's rounding, 2^-8 = 0.4%
    # (measured: up to 0.24%, in the mean Q, a mean of values of both signs).
    args = qwr.Args(critic_steps=3, actor_steps=3, batch_size=32, target_update_every=2, bf16_matmuls=bf16)
    torch.manual_seed(0)
    buf = qwr.ReplayBuffer(64, 1, 5, 2, "cpu")
    buf.add(dict(obs=torch.randn(64, 1, 5), next_obs=torch.randn(64, 1, 5), action=torch.randn(64, 1, 2),
                 mu_mean=torch.randn(64, 1, 2), mu_std=torch.full((64, 1, 2), 0.4), next_mu_mean=torch.randn(64, 1, 2),
                 reward=torch.randn(64, 1), terminated=torch.rand(64, 1) < 0.1, episode_end=torch.rand(64, 1) < 0.2))
    results = []
    for compile_ in (False, True):
        torch.manual_seed(1)
        learner = qwr.make_learner(args, 5, qwr.gym.spaces.Box(-1, 1, (2,)), "cpu", 1000)
        critic_update = qwr.compiled(qwr.critic_step, qwr.replace(args, compile=compile_), torch.device("cpu"))
        actor_update = qwr.compiled(qwr.actor_step, qwr.replace(args, compile=compile_), torch.device("cpu"))
        assert (critic_update is qwr.critic_step) != compile_
        torch.manual_seed(2)  # the same batches and sampled actions
        m = qwr.train_critic(args, buf, learner.critic, learner.target, learner.critic_opt, learner.obs_norm,
                             critic_update)
        m |= qwr.train_actor(args, buf, learner.actor, learner.critic, learner.actor_opt, learner.obs_norm,
                             actor_update)
        results.append(m)
    eager, fast = results
    for key in eager:
        assert fast[key] == pytest.approx(eager[key], rel=1e-2 if bf16 else 1e-4, abs=1e-6), key


STOPPABLE = qwr.Args(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=6, actor_steps=6,
                     target_update_every=4, batch_size=16, buffer_size=1000, eval_every=2, eval_episodes=1,
                     save_model=True, cuda=False, compile=False)


def stop_in_iteration_2(args: qwr.Args, phase: str, after: int, monkeypatch) -> Path:
    """Run args in the current directory with a signal arriving during gradient step `after` + 1 of
    `phase` ("critic" or "actor") in iteration 2; returns the checkpoint the stopped run wrote."""
    monkeypatch.setattr(qwr.Stop, "signal", None)
    real_step, calls = getattr(qwr, f"{phase}_step"), []

    def stopping_step(*a, **k):
        calls.append(1)
        if len(calls) == args.critic_steps + after:  # (critic_steps = actor_steps here)
            qwr.Stop.signal = signal.SIGINT
        return real_step(*a, **k)

    monkeypatch.setattr(qwr, f"{phase}_step", stopping_step)
    with pytest.raises(SystemExit):
        qwr.train(args)
    monkeypatch.setattr(qwr, f"{phase}_step", real_step)
    qwr.Stop.signal = None
    return next(Path("runs").glob("*/qwr_continuous.pt")).resolve()


def counting_steps(monkeypatch) -> dict:
    """Count the critic and actor gradient steps taken from now on."""
    counts = {"critic": 0, "actor": 0}
    for phase in counts:
        def counted(*a, _phase=phase, _real=getattr(qwr, f"{phase}_step"), **k):
            counts[_phase] += 1
            return _real(*a, **k)
        monkeypatch.setattr(qwr, f"{phase}_step", counted)
    return counts


@pytest.mark.parametrize("phase, after", [("critic", 3), ("actor", 2)])
def test_a_run_stopped_between_two_gradient_steps_goes_on_with_the_rest_of_its_iteration(phase, after, tmp_path,
                                                                                           monkeypatch):
    # Stopped in the last of two iterations, after `after` of its 6 critic (or actor) steps, then resumed:
    # the resumed run takes only the rest of the iteration's steps, and the networks, the target and the
    # optimisers are those of the run that was not stopped, bit for bit (CPU, eager); so, to rounding, are
    # the iteration's logged losses, and its training return is there. The target is copied every 4 critic
    # steps, so a stop at 3 needs the target of the moment.
    whole, whole_ckpt = run_whole(qwr.train, STOPPABLE, tmp_path, monkeypatch)
    path = stop_in_iteration_2(STOPPABLE, phase, after, monkeypatch)
    saved = torch.load(path, weights_only=False)
    assert saved["iteration"] == 1 and saved["partial"][phase][0] == after
    counts = counting_steps(monkeypatch)
    resumed = qwr.train(replace(STOPPABLE, checkpoint_path=str(path)))
    assert counts == {"critic": 6 - after if phase == "critic" else 0, "actor": 6 - after if phase == "actor" else 6}
    for key in ("critic_loss", "actor_loss", "q_mean", "episodic_return"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    resumed_ckpt = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_learning_state(whole_ckpt, resumed_ckpt)


def test_after_the_rest_of_a_stopped_iteration_the_next_one_is_whole(tmp_path, monkeypatch):
    # Three iterations, stopped after 3 critic steps of the second: the resumed run takes 3 + 6 critic steps
    # and 6 + 6 actor steps, and collects the third iteration's steps.
    monkeypatch.chdir(tmp_path)
    args = replace(STOPPABLE, total_timesteps=300, eval_every=3)
    path = stop_in_iteration_2(args, "critic", 3, monkeypatch)
    # A checkpoint stopped inside an iteration resumes only with the step counts it was stopped with.
    with pytest.raises(qwr.UsageError, match="resume it with --critic-steps 6 --actor-steps 6 --target-update-every 4"):
        qwr.train(replace(args, checkpoint_path=str(path), critic_steps=8))
    counts = counting_steps(monkeypatch)
    resumed = qwr.train(replace(args, checkpoint_path=str(path)))
    assert counts == {"critic": 9, "actor": 12} and resumed["global_step"] == 300


def test_a_checkpoint_goes_on_only_with_the_obs_clip_critic_input_and_matmuls_it_was_trained_with(tmp_path, monkeypatch):
    # Neither is in the networks' weights: resumed without them, a run would change what its critic sees.
    monkeypatch.chdir(tmp_path)
    trained = replace(STOPPABLE, obs_clip=5.0, critic_clips_actions=True, bf16_matmuls=True)
    path = qwr.train(trained)["checkpoint"]
    more = replace(trained, checkpoint_path=path, total_timesteps=300)
    with pytest.raises(qwr.UsageError, match="trained with --obs-clip 5.0$"):
        qwr.train(replace(more, obs_clip=0.0))
    with pytest.raises(qwr.UsageError, match="trained with --critic-clips-actions$"):
        qwr.train(replace(more, critic_clips_actions=False))
    with pytest.raises(qwr.UsageError, match="trained with --bf16-matmuls$"):
        qwr.train(replace(more, bf16_matmuls=False))
    # Evaluating needs the actor's observations only.
    ev = qwr.train(replace(more, critic_clips_actions=False, eval_only=True, eval_episodes=1))
    assert np.isfinite(ev["eval_return"])
    assert qwr.train(more)["global_step"] == 300


def test_a_diverged_run_stopped_inside_an_iteration_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    # The critic's losses turn NaN in iteration 2, whose updates a signal then cuts short: the run ends with
    # the FloatingPointError, and the checkpoint of iteration 1 stays as it was.
    monkeypatch.chdir(tmp_path)
    real_step, calls = qwr.critic_step, []

    def nan_step(*a, **k):
        calls.append(1)
        out = real_step(*a, **k)
        return out * float("nan") if len(calls) > 6 else out

    monkeypatch.setattr(qwr, "critic_step", nan_step)
    with pytest.raises(FloatingPointError, match="non-finite losses at step 200"):
        stop_in_iteration_2(replace(STOPPABLE, eval_every=1), "critic", 3, monkeypatch)
    assert torch.load(next(Path("runs").glob("*/qwr_continuous.pt")), weights_only=False)["iteration"] == 1


def test_the_resume_command_of_a_stopped_save_dataset_run_leaves_the_dataset_out(tmp_path, monkeypatch, capsys):
    # --save-dataset needs a run from scratch (check_args refuses it with --checkpoint-path): the printed
    # command must still resume, so it leaves the flag out and says so.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qwr.Stop, "signal", signal.SIGTERM)
    args = replace(STOPPABLE, save_dataset="local/hopper/some-v0")
    Path("runs/run").mkdir(parents=True)
    learner = qwr.make_learner(args, 11, qwr.gym.spaces.Box(-1, 1, (3,)), "cpu", 1000)
    with pytest.raises(SystemExit):
        qwr.exit_interrupted(args, learner, 1, "run")
    command = capsys.readouterr().err.split("resume with: ")[1]
    assert "--save-dataset" not in command.split(" (")[0] and "(no dataset: --save-dataset local/hopper/some-v0" in command
    qwr.check_args(replace(args, save_dataset=None, checkpoint_path="runs/run/qwr_continuous.pt"), offline=False)


def test_online_training_gives_the_critic_the_envs_action_bounds(tmp_path, monkeypatch):
    # The vector env's ClipAction takes any action, so its own action space is unbounded: the at-bound
    # diagnostic, --critic-clips-actions and the datasets' actions need the env's bounds.
    monkeypatch.chdir(tmp_path)
    real, spaces = qwr.make_learner, []

    def recording(args, obs_dim, action_space, *rest):
        spaces.append(action_space)
        return real(args, obs_dim, action_space, *rest)

    monkeypatch.setattr(qwr, "make_learner", recording)
    qwr.train(qwr.Args(env_id="Hopper-v4", total_timesteps=100, steps_per_iteration=100, critic_steps=2, actor_steps=2,
                       batch_size=16, buffer_size=1000, eval_episodes=0, cuda=False, compile=False))
    assert np.array_equal(spaces[0].low, -np.ones(3)) and np.array_equal(spaces[0].high, np.ones(3))
