"""qwr_continuous.py's wiring: the replay buffer's episode boundaries, what collection stores, and for
each update step which network, which state, which distribution and which coefficient it uses, with
stub networks whose outputs differ between the choices (its math: test_qwr_math.py; its runs and
errors: test_scripts.py)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import qwr_continuous as qwr
import qwr_offline
from helpers import record_env_actions


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


def normalizer(mean: float, var: float, dim: int = 1) -> qwr.ObsNormalizer:
    norm = qwr.ObsNormalizer(dim, 0)
    norm.mean.fill_(mean), norm.var.fill_(var)
    return norm


def test_collect_stores_true_final_observations_and_mu_at_the_next_state():
    envs = qwr.make_vec_env(qwr.Args(env_id="Hopper-v4"), 2)
    obs, _ = envs.reset(seed=0)
    torch.manual_seed(0)
    actor, norm = qwr.Actor(11, 3), normalizer(1.0, 4.0, dim=11)  # mu is the policy at the normalised state
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
    # Sampled actions are stored unclipped (mu's density is defined for them), 0.4 around the mean.
    noise = rollout["action"] - rollout["mu_mean"]
    assert abs(noise.std().item() - 0.4) < 0.03 and abs(noise.mean().item()) < 0.03
    assert (rollout["action"].abs() > 1).any() and torch.all(rollout["mu_std"] == 0.4)


@pytest.mark.parametrize("clip_actions, clipped_reward", [("env", True), ("both", True), ("none", False)])
def test_the_env_charges_the_clipped_action_unless_clip_actions_is_none(clip_actions, clipped_reward):
    # Hopper's control cost is 1e-3 * sum(a^2): an action of 5 in every dimension costs 0.075 unclipped, 0.003
    # clipped to 1. The authors' system (none) charges the action as given; MuJoCo still clamps the control.
    rewards = []
    for action in (np.full((1, 3), 5.0), np.ones((1, 3))):
        envs = qwr.make_vec_env(qwr.Args(env_id="Hopper-v4", clip_actions=clip_actions), 1)
        envs.reset(seed=0)
        rewards.append(envs.step(action)[1][0])
        envs.close()
    assert (abs(rewards[0] - rewards[1]) < 1e-9) == clipped_reward
    assert clipped_reward or rewards[1] - rewards[0] == pytest.approx(1e-3 * 3 * (25 - 1), rel=1e-6)


def test_obs_normalizer_matches_numpy_freezes_at_its_limit_and_clips():
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm = qwr.ObsNormalizer(3, 350).double()
    for chunk in x.split(100):
        norm.update(chunk)
    assert norm.count.item() == 350
    assert torch.allclose(norm.mean, x[:350].mean(0)) and torch.allclose(norm.var, x[:350].var(0, correction=0))
    # A dimension that was 0 so far (std 0) and then moves by 1: the authors' normaliser makes it 1e5; --obs-clip 10.
    for clip, expected in ((0.0, 1e5), (10.0, 10.0)):
        norm = qwr.ObsNormalizer(1, 100, clip)
        norm.update(torch.zeros(50, 1))
        assert norm(torch.tensor([[1.0], [-1.0]])).flatten().tolist() == pytest.approx([expected, -expected], rel=1e-4)


# ------------------------------------------------------------ the two update steps, wired to stub networks


class StubQ(torch.nn.Module):
    """Q(s, a) = w * sum(a) + v * sum(s), in return units; the real critic's output scale is 10 here, its
    action bounds [-1, 1]. Another (w, v) is another network; s and s' differ, so the state shows too."""

    out_scale, low, high = 10.0, torch.tensor([-1.0]), torch.tensor([1.0])

    def __init__(self, w: float, v: float):
        super().__init__()
        self.w, self.v = torch.nn.Parameter(torch.tensor(w)), torch.nn.Parameter(torch.tensor(v))

    def forward(self, obs, actions):
        return self.w * actions.sum(-1) + self.v * obs.sum(-1, keepdim=True)


def stored(n, obs, next_obs, action, mu_mean, mu_std, next_mu_mean, reward=1.0):
    """A one-env buffer of n non-terminal steps; obs and mu_mean may vary along the steps."""
    buf = qwr.ReplayBuffer(n, 1, 1, 1, "cpu")
    col = lambda v: torch.as_tensor(v, dtype=torch.float32).expand(n).reshape(n, 1, 1).clone()
    buf.add(dict(obs=col(obs), next_obs=col(next_obs), action=col(action), mu_mean=col(mu_mean),
                 mu_std=col(mu_std), next_mu_mean=col(next_mu_mean), reward=torch.full((n, 1), reward),
                 terminated=torch.zeros(n, 1, dtype=torch.bool), episode_end=torch.zeros(n, 1, dtype=torch.bool)))
    return buf


# The two gradient steps of qwr_offline.py are the same as these (tested with each of the two scripts).
BOTH = pytest.mark.parametrize("module", [qwr, qwr_offline], ids=["online", "offline"])


@BOTH
def test_critic_targets_come_from_the_target_network_at_s_prime_with_actions_of_the_stored_mu_there(module):
    # s = 1, s' = 3, both normalised by (x - 1) / 2: 0 and 1. The stored action is 0.5; mu at s is centred on -5
    # and mu at s' (the next_mu_mean stored) on +5, std ~0. Critic (w, v) = (1, 1), target (7, 11); mean backup,
    # 1-step targets, gamma 0.5, reward 1.
    buf = stored(8, obs=1.0, next_obs=3.0, action=0.5, mu_mean=-5.0, mu_std=1e-6, next_mu_mean=5.0)
    args = module.Args(batch_size=4, target_horizon=1, backup="mean", gamma=0.5)
    critic, target = StubQ(1.0, 1.0), StubQ(7.0, 11.0)
    torch.manual_seed(0)
    loss, q, y = module.critic_step(args, buf.sample(4, 1), critic, target, torch.optim.SGD(critic.parameters(), 0.0),
                                    normalizer(1.0, 4.0)).tolist()
    assert q == pytest.approx(1 * 0.5 + 1 * 0)  # the online critic at (normalised s, the stored action)
    # r + gamma * Q_target(norm(s'), a' ~ mu(.|s')) = 1 + 0.5 (7 * 5 + 11 * 1). The wrong wirings: the online
    # critic 1 + .5 (5 + 1) = 4; s for s' 1 + .5 * 35 = 18.5; mu at s 1 + .5 (-35 + 11) = -11; s' unnormalised 34.5.
    assert y == pytest.approx(24.0, rel=1e-5)
    assert loss == pytest.approx(((0.5 - 24.0) / 10) ** 2, rel=1e-5)  # in the network's units, not returns


@BOTH
def test_the_target_network_is_the_critic_copied_every_target_update_every_steps(module, tmp_path, monkeypatch,
                                                                                  tiny_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])  # conftest.py: 200 Hopper steps
    copies, real_step = [], module.critic_step

    def spy(args, b, critic, target, critic_opt, obs_norm):  # is the target the critic of this moment?
        copies.append(all(torch.equal(p, q) for p, q in zip(critic.parameters(), target.parameters())))
        return real_step(args, b, critic, target, critic_opt, obs_norm)

    monkeypatch.setattr(module, "critic_step", spy)
    updates = dict(critic_steps=7, actor_steps=1, target_update_every=3, batch_size=16, eval_episodes=0, cuda=False)
    if module is qwr:
        qwr.train(qwr.Args(env_id="Hopper-v4", total_timesteps=100, steps_per_iteration=100, buffer_size=1000, **updates))
    else:
        qwr_offline.train(qwr_offline.Args(dataset_id=tiny_dataset[1], download=False, iterations=1, **updates))
    assert copies == [True, False, False, True, False, False, True]


@BOTH
def test_the_actor_regresses_on_actions_of_the_stored_mu_at_s_weighted_by_the_critic_at_s(module):
    # Two kinds of states, s = 2 and s = 5 (next states 12 and 15), normalised by (x - 1) / 2 to 0.5 and 2,
    # with Q(s, a) = s * sum(a): how the two states' advantages compare depends on which state the critic
    # sees, and whether normalised. mu at s is centred on 1.5 (beyond the bound 1, std 0.3); mu at s' on -3.
    # The current policy's mean is 0.2 everywhere, its std 0.4.
    n = 8
    obs = torch.tensor([2.0, 5.0] * (n // 2))
    norm = (obs - 1) / (2 + 1e-5)
    buf = stored(n, obs=obs, next_obs=obs + 10, action=0.0, mu_mean=1.5, mu_std=0.3, next_mu_mean=-3.0)
    args = module.Args(batch_size=n, n_samples=4, beta=0.5, max_weight=3.0, action_std=0.4)

    class ObsTimesAction(StubQ):
        def forward(self, obs, actions):
            return obs.sum(-1, keepdim=True) * actions.sum(-1)

    actor = torch.nn.Linear(1, 1)
    with torch.no_grad():
        actor.weight.zero_(), actor.bias.fill_(0.2)
    torch.manual_seed(0)
    b = buf.gather(torch.arange(n), torch.zeros(n, dtype=torch.long), 1)
    loss, clipped, *at_bound = module.actor_step(args, b, actor, ObsTimesAction(0.0, 0.0),
                                                 torch.optim.SGD(actor.parameters(), 0), normalizer(1.0, 4.0)).tolist()
    # The same draws by hand: a_j = 1.5 + 0.3 z, Q = s a_j, A = Q - mean_j Q normalised over the batch.
    torch.manual_seed(0)
    a = 1.5 + 0.3 * torch.randn(n, 4, 1)
    q = norm[:, None] * a[..., 0]
    adv = q - q.mean(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    w = torch.exp(adv / 0.5).clamp(max=3.0)
    log_prob = -((a[..., 0] - 0.2) ** 2) / (2 * 0.4**2) - math.log(0.4 * math.sqrt(2 * math.pi))
    assert loss == pytest.approx(-(w * log_prob).mean().item(), rel=1e-5)
    assert clipped == pytest.approx((w >= 3.0).float().mean().item()) and 0 < clipped < 1  # the clip is at 3
    assert at_bound in ([0.0], [])  # the policy's mean 0.2 is inside the bounds [-1, 1] (logged online only)
    # The wrong wirings give other losses: the critic at s' (the states' advantages compare otherwise), at s
    # unnormalised, actions from mu at s' (-3), from the current policy (0.2), no clip.
    for wrong in (dict(obs=(obs + 9) / 2), dict(obs=obs), dict(centre=-3.0), dict(centre=0.2), dict(clip=1e9)):
        torch.manual_seed(0)
        a = wrong.get("centre", 1.5) + 0.3 * torch.randn(n, 4, 1)
        q = wrong.get("obs", norm)[:, None] * a[..., 0]
        adv = q - q.mean(-1, keepdim=True)
        adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
        w = torch.exp(adv / 0.5).clamp(max=wrong.get("clip", 3.0))
        log_prob = -((a[..., 0] - 0.2) ** 2) / (2 * 0.4**2) - math.log(0.4 * math.sqrt(2 * math.pi))
        assert abs(-(w * log_prob).mean().item() - loss) > 1e-3 * abs(loss), wrong


@pytest.mark.parametrize("clip_actions", ["env", "none", "both"])
def test_the_critic_sees_the_sampled_action_unless_clip_actions_is_both(clip_actions):
    torch.manual_seed(0)
    low, high = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5])
    critic = qwr.QNetwork(3, low, high, qwr.Args(clip_actions=clip_actions))
    q = critic(torch.randn(3), torch.tensor([[3.0, -2.0], [1.0, -0.5], [0.2, 0.1]]))
    # (3, -2) is executed as (1, -0.5); the authors' critic tells the two apart.
    assert (abs(q[0].item() - q[1].item()) < 1e-5) == (clip_actions == "both")
    assert abs(q[1].item() - q[2].item()) > 1e-3


def test_critic_head_init_starts_q_near_zero_and_the_gradient_clip_bounds_each_networks_norm():
    torch.manual_seed(0)
    low, high = -torch.ones(2), torch.ones(2)
    obs, actions = torch.randn(64, 5) * 3, torch.randn(64, 4, 2)
    default = qwr.QNetwork(5, low, high, qwr.Args())
    small = qwr.QNetwork(5, low, high, qwr.Args(critic_head_init=0.01))
    # The std of Q over 4 actions, in reward units: PyTorch's default head (U(+-1/16)) 16, U(+-0.01) 2 (measured).
    spread = lambda net: net(obs, actions).std(-1).mean().item()
    assert spread(default) > 4 * spread(small) and small.head[-1].bias.abs().max() == 0
    # A critic step with --max-grad-norm: the gradient the optimiser sees has norm at most that.
    buf = qwr.ReplayBuffer(64, 1, 5, 2, "cpu")
    buf.add(dict(obs=obs[:, None], next_obs=obs[:, None], action=actions[:, None, 0], mu_mean=actions[:, None, 1],
                 mu_std=torch.full((64, 1, 2), 0.4), next_mu_mean=actions[:, None, 2], reward=torch.randn(64, 1) * 100,
                 terminated=torch.zeros(64, 1, dtype=torch.bool), episode_end=torch.zeros(64, 1, dtype=torch.bool)))
    actor, norms = qwr.Actor(5, 2), {}

    class Recording(torch.optim.SGD):  # keeps the norm of the gradient it is handed
        def step(self, closure=None):
            grads = [p.grad.flatten() for group in self.param_groups for p in group["params"]]
            norms[self.name] = torch.cat(grads).norm().item()

    for max_norm in (0.0, 0.01):
        torch.manual_seed(1)
        args = qwr.Args(max_grad_norm=max_norm)
        critic_opt, actor_opt = Recording(default.parameters(), 0.0), Recording(actor.parameters(), 0.0)
        critic_opt.name, actor_opt.name = f"critic {max_norm}", f"actor {max_norm}"
        qwr.critic_step(args, buf.sample(32, 3), default, small, critic_opt, normalizer(0.0, 1.0))
        qwr.actor_step(args, buf.sample(32, 1), actor, default, actor_opt, normalizer(0.0, 1.0))
    assert norms["critic 0.0"] > 0.01 and norms["critic 0.01"] == pytest.approx(0.01, rel=1e-4)
    assert norms["actor 0.0"] > 0.01 and norms["actor 0.01"] == pytest.approx(0.01, rel=1e-4)


def test_sampled_actions_come_from_each_state_s_own_gaussian():
    torch.manual_seed(0)
    mean, std = torch.tensor([[0.0, 10.0], [-5.0, 1.0]]), torch.tensor([[1.0, 0.1], [0.5, 2.0]])
    a = qwr.sample_actions(mean, std, 20_000)
    assert a.shape == (2, 20_000, 2)
    assert torch.allclose(a.mean(1), mean, atol=0.05) and torch.allclose(a.std(1), std, rtol=0.03)


def random_buffer(obs_dim=3, act_dim=2, n=64) -> qwr.ReplayBuffer:
    buf = qwr.ReplayBuffer(n, 1, obs_dim, act_dim, "cpu")
    buf.add(dict(obs=torch.randn(n, 1, obs_dim) * 10, next_obs=torch.randn(n, 1, obs_dim) * 10,
                 action=torch.randn(n, 1, act_dim), mu_mean=torch.randn(n, 1, act_dim),
                 mu_std=torch.full((n, 1, act_dim), 0.4), next_mu_mean=torch.randn(n, 1, act_dim),
                 reward=torch.randn(n, 1) * 100, terminated=torch.rand(n, 1) < 0.1, episode_end=torch.rand(n, 1) < 0.2))
    return buf


def updates(args: qwr.Args, buf: qwr.ReplayBuffer, steps: int, step_fns=(qwr.critic_step, qwr.actor_step)):
    """`steps` critic and actor steps of fresh networks (seed 1) on buf's batches (seed 2); their losses."""
    torch.manual_seed(1)
    obs_dim, act_dim = buf.data["obs"].shape[-1], buf.data["action"].shape[-1]
    actor = qwr.Actor(obs_dim, act_dim)
    critic = qwr.QNetwork(obs_dim, -torch.ones(act_dim), torch.ones(act_dim), args)
    target, norm = qwr.copy.deepcopy(critic), qwr.ObsNormalizer(obs_dim, 1000)
    norm.update(buf.data["obs"])
    actor_opt, critic_opt = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
    torch.manual_seed(2)
    out = []
    for _ in range(steps):
        out.append(step_fns[0](args, buf.sample(16, args.target_horizon), critic, target, critic_opt, norm))
        out.append(step_fns[1](args, buf.sample(16, 1), actor, critic, actor_opt, norm))
    return torch.cat(out)


@pytest.mark.parametrize("flags", [dict(tau=tau, backup_scale=scale) for tau in (1e-6, 1e6)
                                   for scale in ("mad", "std", "none")]
                         + [dict(beta=1e-3), dict(max_weight=1e6), dict(beta=1e-3, max_weight=1e6)])
def test_extreme_settings_keep_every_loss_finite(flags):
    args = qwr.Args(**flags)
    assert torch.isfinite(updates(args, random_buffer(), 5)).all()
    # The backup stays between the mean and the max of the sampled values, whatever the temperature.
    q = torch.randn(64, 3, 4) * 1e3
    q[0] = 5.0  # a state whose sampled values are all equal
    out = qwr.backup_values(q, args.backup, args.tau, args.backup_scale)
    assert (out <= q.amax(-1) + 1e-3).all() and (out >= q.mean(-1) - 1e-3).all()


def test_compiled_updates_give_the_eager_losses():
    # Three critic and three actor steps from the same seed and the same batches, eager and through
    # torch.compile (--compile): what dynamo captures of the steps (graph breaks, the optimiser, the
    # random draws from the stored mu), with the aot_eager backend. Inductor's kernels take about a
    # minute to build on 2 CPU cores; tests/test_cuda.py compares them with eager steps on a GPU.
    args, buf = qwr.Args(max_grad_norm=50.0, critic_head_init=0.01), random_buffer(5, 2)
    eager = updates(args, buf, 3)
    fast = updates(args, buf, 3, [torch.compile(f, backend="aot_eager") for f in (qwr.critic_step, qwr.actor_step)])
    assert fast.tolist() == pytest.approx(eager.tolist(), rel=1e-4, abs=1e-6)


def test_a_resumed_run_goes_on_from_its_last_iteration_in_the_same_log_with_each_step_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = qwr.Args(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=4, actor_steps=4,
                    batch_size=16, buffer_size=1000, eval_every=1, eval_episodes=1, save_model=True, cuda=False)
    first = qwr.train(args)
    ckpt = torch.load(first["checkpoint"], weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["buffer"][2] == 200
    # The checkpoint holds the buffer and the normaliser; loaded, the episode in progress ends at the newest
    # step (the envs restart, so no target may run on from it into the next episode).
    assert not ckpt["buffer"][0]["episode_end"][(ckpt["buffer"][1] - 1) % 1000].all()
    saved = dict(actor=qwr.Actor(11, 3), critic=qwr.QNetwork(11, -torch.ones(3), torch.ones(3), args),
                 obs_norm=qwr.ObsNormalizer(11, 1))
    saved["target"] = qwr.copy.deepcopy(saved["critic"])
    saved |= dict(actor_opt=torch.optim.Adam(saved["actor"].parameters()),
                  critic_opt=torch.optim.Adam(saved["critic"].parameters()))
    buffer = qwr.ReplayBuffer(1000, 1, 11, 3, "cpu")
    assert qwr.load_checkpoint(first["checkpoint"], saved, buffer, "cpu") == (2, first["run_name"])
    assert (buffer.size, buffer.ptr, saved["obs_norm"].count.item()) == (200, 200, 200)
    assert buffer.data["episode_end"][199].all() and buffer.data["obs"][:200].abs().sum() > 0
    # A run killed in iteration 3 after logging some of it: the resumed run, started in another second, drops
    # those events and redoes the iteration, in the first run's log directory.
    writer = qwr.SummaryWriter(f"runs/{first['run_name']}")
    writer.add_scalar("losses/critic_loss", 123.0, 300)
    writer.close()
    real_time = qwr.time.time
    monkeypatch.setattr(qwr.time, "time", lambda: real_time() + 10)
    resumed = qwr.train(replace(args, total_timesteps=400, checkpoint_path=first["checkpoint"]))
    assert resumed["run_name"] == first["run_name"] and resumed["global_step"] == 400
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"runs/{first['run_name']}")
    acc.Reload()
    steps = [e.step for e in acc.Scalars("losses/critic_loss")]
    assert steps == [100, 200, 300, 400] and 123.0 not in [e.value for e in acc.Scalars("losses/critic_loss")]


def test_evaluation_acts_with_the_mean_of_the_normalised_observation_or_samples_around_it(monkeypatch):
    actions, seen = record_env_actions(qwr, monkeypatch), []

    class Half(torch.nn.Module):  # the mean action: half the first normalised observation, in every dimension
        def forward(self, obs):
            seen.append(obs.clone())
            return 0.5 * obs[:, :1].expand(-1, 3)

    args, norm = qwr.Args(env_id="Hopper-v4", eval_episodes=2), normalizer(1.0, 4.0)
    qwr.evaluate(args, Half(), norm, "cpu")
    deterministic = np.concatenate(actions)
    inputs = torch.cat(seen)
    assert torch.allclose(torch.as_tensor(deterministic), 0.5 * inputs[:, :1].expand(-1, 3))
    assert inputs[0, 0].item() == pytest.approx((1.25 - 1) / 2, abs=0.01)  # Hopper starts at height ~1.25
    actions[:], seen[:] = [], []
    qwr.evaluate(args, Half(), norm, "cpu", action_std=0.4)
    noise = np.concatenate(actions) - 0.5 * torch.cat(seen)[:, :1].numpy()
    assert abs(noise.std() - 0.4) < 0.03 and abs(noise.mean()) < 0.03
