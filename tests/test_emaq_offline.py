"""emaq_offline.py: the autoregressive behaviour model's likelihood and sampling,
the ensemble's target, which networks, states and samples each update and the
policy use (stub networks), a run from a Minari dataset made by qwr_continuous.py
resumed from its checkpoint, and extreme settings, finite or stopped loudly."""

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import emaq_offline as emaq

LOW, HIGH = np.array([-1.0, 0.0]), np.array([1.0, 4.0])


def model_with_fixed_logits(logits: torch.Tensor) -> emaq.AutoregressiveBehavior:
    """A 2-d model whose dimension i has logits[i] whatever the state and a[:i]."""
    model = emaq.AutoregressiveBehavior(obs_dim=3, low=LOW, high=HIGH, n_bins=4, embed=8, hidden=8)
    with torch.no_grad():
        model.heads[-1].weight.zero_()
        model.heads[-1].bias.copy_(logits[:, None, :])
    return model


def test_log_likelihood_of_a_hand_made_case():
    # Dimension 0 over [-1, 1] in bins of 0.5, dimension 1 over [0, 4] in bins of 1.
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]]))
    model = model_with_fixed_logits(logits)
    actions = torch.tensor([[-0.9, 3.5], [0.2, 2.0], [1.0, 0.0]])  # bins (0, 3), (2, 2), (3, 0): edges go inside
    assert model.bins(actions).tolist() == [[0, 3], [2, 2], [3, 0]]
    want = [math.log(0.1 * 0.1), math.log(0.3 * 0.4), math.log(0.4 * 0.25)]
    assert model.log_prob_bins(torch.zeros(3, 3), actions).tolist() == pytest.approx(want, rel=1e-5)


def test_each_dimension_sees_only_the_dimensions_before_it():
    torch.manual_seed(0)
    model = emaq.AutoregressiveBehavior(obs_dim=3, low=-np.ones(4), high=np.ones(4), n_bins=5, embed=8, hidden=8)
    obs, a = torch.randn(6, 3), torch.rand(6, 4) * 2 - 1
    base = model.logits(obs, a)
    for j in range(4):
        b = a.clone()
        b[:, j] += 0.5
        changed = (model.logits(obs, b) - base).abs().amax((0, 2)) > 1e-6
        assert changed.tolist() == [i > j for i in range(4)], j


def test_samples_follow_the_bin_probabilities_uniformly_within_bins():
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0001, 0.0001, 0.0001, 0.9997]]))
    torch.manual_seed(1)
    a = model_with_fixed_logits(logits).sample(torch.zeros(50, 3), 400).reshape(-1, 2)  # 20000 draws
    assert (a[:, 0] < -0.5).float().mean().item() == pytest.approx(0.7, abs=0.02)
    inside = a[a[:, 0] < -0.5, 0]
    assert inside.min() >= -1.0 and inside.mean().item() == pytest.approx(-0.75, abs=0.01)  # uniform in its bin
    assert (a[:, 1] >= 3.0).float().mean().item() > 0.99 and a[:, 1].max() <= 4.0


# Two Q-members that disagree about which of mu's three proposals is best:
# member 0 prefers action 1, member 1 prefers action 0, and neither prefers
# action 2, the best under the pessimistic combination (their min).
#   action         0    1    2
#   member 0       1    5    3
#   member 1       4    2    3
#   min            1    2    3   <- lambda = 1: best is action 2, value 3
#   max            4    5    3   <- lambda = 0: best is action 1, value 5
#   .5 min + .5 max  2.5  3.5  3 <- lambda = .5: best is action 1, value 3.5
# Combining after the max over actions gives other numbers: the members'
# own bests are 5 and 4, so min = 4 (not 3) and .5 * 4 + .5 * 5 = 4.5 (not 3.5).
Q_TABLE = torch.tensor([[1.0, 5.0, 3.0], [4.0, 2.0, 3.0]])


class DisagreeingQ:
    """Member k values (s, a) as Q_TABLE[k, a] + s_0: the state shifts every value alike."""

    def __call__(self, obs, action):
        return Q_TABLE[:, action[:, 0].long()] + obs[:, 0]


class ProposeInOrder:
    """mu proposes actions 0, 1, 2 in every state, except that a state whose
    first feature is negative gets them in reverse order 2, 1, 0."""

    def sample(self, obs, n):
        assert n == 3
        forward = torch.tensor([[0.0], [1.0], [2.0]])
        return torch.stack([forward.flip(0) if o[0] < 0 else forward for o in obs])


def test_target_combines_the_members_per_action_then_takes_the_best_of_n():
    # s' = 0 and s' = 10 (all values + 10); the second transition is terminal.
    batch = dict(obs=torch.tensor([[-7.0], [-7.0]]), action=torch.zeros(2, 1), next_obs=torch.tensor([[0.0], [10.0]]),
                 reward=torch.tensor([1.0, 1.0]), terminated=torch.tensor([False, True]))
    target = lambda lam: emaq.emaq_target(batch, ProposeInOrder(), DisagreeingQ(), 3, lam, 0.5).tolist()
    # lambda = 1: max(min) = 3 at s' = 0, so 1 + 0.5 * 3 (combining after the max would give 1 + 0.5 * 4).
    assert target(1.0) == [1.0 + 0.5 * 3.0, 1.0]
    # lambda = .5: max(2.5, 3.5, 3) = 3.5 (combining after the max: 4.5).
    assert target(0.5) == [1.0 + 0.5 * 3.5, 1.0]
    # lambda = 0: max(max) = 5, the one case where the order does not matter.
    assert target(0.0) == [1.0 + 0.5 * 5.0, 1.0]
    # Q is read at s', not s (-7): at s' = 10 the same proposals are worth 10 more.
    batch["terminated"] = torch.tensor([False, False])
    assert target(1.0) == [1.0 + 0.5 * 3.0, 1.0 + 0.5 * (10.0 + 3.0)]


def test_act_picks_the_best_proposal_under_the_combined_ensemble():
    # State 0 gets the proposals in order 0, 1, 2, state 1 (first feature < 0) in order 2, 1, 0,
    # so the best action sits at index 2 in one state and at index 0 in the other.
    obs = torch.tensor([[0.0], [-1.0]])
    act = lambda lam: emaq.act(obs, ProposeInOrder(), DisagreeingQ(), 3, lam)
    # lambda = 1 (the default): the min is (1, 2, 3), so action 2 in both states. Member 0
    # alone would pick action 1, member 1 alone action 0, the max or the mean action 1.
    assert act(1.0).tolist() == [[2.0], [2.0]]
    # lambda = 0: the max is (4, 5, 3), so action 1; min-only code would still pick 2.
    assert act(0.0).tolist() == [[1.0], [1.0]]


def test_sampling_conditions_each_dimension_on_the_earlier_ones_drawn_for_the_same_sample():
    # Three dimensions over [-1, 1] in 4 bins of 0.5. Hand-set heads, independent of the state:
    #   dimension 0 draws bin 0 or bin 3, 50/50, so a_0 lies in [-1, -.5) or [.5, 1];
    #   dimension 1 copies the sign of a_0: logits C * relu(-a_0) for bin 0, C * relu(a_0) for bin 3;
    #   dimension 2 flips the sign of a_1:  logits C * relu(a_1) for bin 0, C * relu(-a_1) for bin 3.
    # |a| >= .5 keeps every logit gap >= C / 2 = 20, so the copies are exact (odds e^-20).
    # Bins 1 and 2 get a bias of -30 throughout.
    model = emaq.AutoregressiveBehavior(obs_dim=3, low=-np.ones(3), high=np.ones(3), n_bins=4, embed=8, hidden=8)
    first, w2, w3, last = model.heads[0], model.heads[2], model.heads[4], model.heads[6]
    a = lambda j: 8 + j  # the input column of a_j, after the 8 of the state embedding
    C = 40.0
    with torch.no_grad():
        for p in model.heads.parameters():
            p.zero_()
        for i in range(3):
            w2.weight[i, 0, 0] = w2.weight[i, 1, 1] = w3.weight[i, 0, 0] = w3.weight[i, 1, 1] = 1.0  # pass units 0, 1
            last.bias[i, 0, 1:3] = -30.0
            # a_i and the later dimensions must never be seen: weight them heavily into both units.
            first.weight[i, [a(j) for j in range(i, 3)], :2] = 7.0
        first.weight[1, a(0), 0], first.weight[1, a(0), 1] = 1.0, -1.0  # unit 0 = relu(a_0), unit 1 = relu(-a_0)
        last.weight[0, 0, 3] = C  # dimension 0 reads unit 0 too, which only the forbidden inputs feed
        last.weight[1, 1, 0], last.weight[1, 0, 3] = C, C  # bin 0 <- relu(-a_0), bin 3 <- relu(a_0)
        first.weight[2, a(1), 0], first.weight[2, a(1), 1] = 1.0, -1.0  # the same of a_1
        last.weight[2, 0, 0], last.weight[2, 1, 3] = C, C  # flipped: bin 0 <- relu(a_1), bin 3 <- relu(-a_1)
    torch.manual_seed(0)
    obs = torch.randn(5, 3)
    samples = model.sample(obs, 200)  # [5 states, 200 samples, 3]
    bins = model.bins(samples.reshape(-1, 3)).view(5, 200, 3)
    assert set(bins.unique().tolist()) == {0, 3}
    # Dimension 0 is a fair coin in every state: both bins in each state's 200 samples.
    share = (bins[..., 0] == 0).float().mean(1).tolist()
    assert all(0.35 < f < 0.65 for f in share), share
    # Each sample's a_1 copies ITS OWN a_0 (not zeros, not another sample's), a_2 flips its a_1.
    copied = (bins[..., 1] == bins[..., 0]).sum().item()
    flipped = (bins[..., 2] == 3 - bins[..., 1]).sum().item()
    assert (copied, flipped) == (1000, 1000), "of 1000 samples, these drew a_1 from their a_0 and a_2 from their a_1"
    # The teacher-forced logits (what mu is trained with) pick the same bins as sampling did.
    forced = model.logits(obs.repeat_interleave(200, 0), samples.reshape(-1, 3)).argmax(-1).view(5, 200, 3)
    assert torch.equal(forced[..., 1:], bins[..., 1:]), "sampling and the teacher-forced logits disagree"


# ------------------------------------------------ wiring: which network, state and samples (stub networks)


class TableQ(nn.Module):
    """Two members valuing (s, a) as scale * (Q_TABLE[k, a] + s_0), scale a parameter (the EMA moves it)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, obs, action):
        return self.scale * (Q_TABLE[:, action[:, 0].long()] + obs[:, 0])


class ProposeAtState:
    """mu proposes actions 0, 1, 2 (N = 3) at a state whose first feature is >= 0, and only action 0 elsewhere."""

    def sample(self, obs, n):
        assert n == 3, n
        return torch.stack([torch.tensor([[0.0], [1.0], [2.0]]) if o[0] >= 0 else torch.zeros(3, 1) for o in obs])


def stub_learner(online_scale: float) -> emaq.Learner:
    """The online ensemble at scale online_scale, its target at scale 1; plain SGD at lr 0: the step leaves
    the online ensemble where it is, so that only the EMA moves the target."""
    online = TableQ(online_scale)
    return emaq.Learner(behavior=ProposeAtState(), q_ensemble=online, target_q=TableQ(1.0), mu_opt=None,
                        q_opt=torch.optim.SGD(online.parameters(), lr=0.0))


# One transition from s = -7 to s' = 10, reward 1, not terminal; gamma = .5, N = 3, lambda = 1.
BATCH = dict(obs=torch.tensor([[-7.0]]), action=torch.zeros(1, 1), next_obs=torch.tensor([[10.0]]),
             reward=torch.tensor([1.0]), terminated=torch.tensor([False]))
ARGS = emaq.Args(n_samples=3, ensemble_lambda=1.0, gamma=0.5, ema=0.9)


def test_the_q_target_is_the_ema_ensemble_at_s_prime_over_n_actions_of_mu_at_s_prime():
    # The online ensemble is 0 everywhere, so the loss is 2 members * (0 - y)^2.
    #   right:  mu at s' proposes 0, 1, 2; the target at s' = 10 combines per action, min = (1, 2, 3) + 10,
    #           best 13:                                       y = 1 + .5 * 13 = 7.5, loss 2 * 7.5^2 = 112.5
    #   the online ensemble (0) instead of the target:        y = 1,                 loss 2
    #   the target at s = -7 instead of s':                    y = 1 + .5 * (3 - 7) = -1, loss 2
    #   mu at s (only action 0) instead of s':                 y = 1 + .5 * (1 + 10) = 6.5, loss 84.5
    #   the members' own bests (5, 4), then their min (4):     y = 1 + .5 * 14 = 8,   loss 128
    loss, q_mean = emaq.q_step(ARGS, BATCH, stub_learner(0.0)).tolist()
    assert (loss, q_mean) == (2 * 7.5**2, 0.0)


def test_the_targets_follow_the_online_ensemble_at_the_flags_ema_rate():
    # theta_target <- ema * theta_target + (1 - ema) * theta: .9 * 1 + .1 * 2 = 1.1 (ema = .9, not the default
    # .995); the rate the other way round gives .1 * 1 + .9 * 2 = 1.9, a copy 2, no update 1.
    learner = stub_learner(2.0)
    emaq.q_step(ARGS, BATCH, learner)
    assert learner.q_ensemble.scale.item() == 2.0  # (lr 0: the online ensemble did not move)
    assert learner.target_q.scale.item() == pytest.approx(1.1, abs=1e-6)


def tiny_run(dataset_id: str, **flags) -> emaq.Args:
    """A tiny run on conftest.py's dataset (200 steps of qwr_continuous.py): 30 mu steps, 2 Q-networks of 32 units."""
    return emaq.Args(**dict(dataset_id=dataset_id, mu_steps=30, num_updates=20, eval_every=10, eval_episodes=1,
                            n_samples=2, num_q=2, q_hidden=32, mu_embed=32, batch_size=16, cuda=False) | flags)


def test_the_policy_is_the_best_of_n_proposals_under_the_online_ensemble(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    monkeypatch.chdir(tmp_path)
    learners, acted, make_learner, act = [], [], emaq.make_learner, emaq.act
    monkeypatch.setattr(emaq, "make_learner", lambda *a: learners.append(make_learner(*a)) or learners[-1])
    monkeypatch.setattr(emaq, "act", lambda obs, mu, q, n, lam: acted.append((mu, q, n)) or act(obs, mu, q, n, lam))
    emaq.train(tiny_run(tiny_dataset[1], n_samples=3, num_updates=10))
    [learner] = learners
    # mu proposes, the online ensemble (not its EMA target) chooses, in every evaluation step
    assert all(mu is learner.behavior and q is learner.q_ensemble for mu, q, _ in acted)
    # mu alone first (N = 1, before the Q loop), then the EMaQ policy with N = --n-samples = 3
    ns = [n for _, _, n in acted]
    assert ns[0] == 1 and ns[-1] == 3 and ns == sorted(ns) and set(ns) == {1, 3}


# ------------------------------------------------ a run from a Minari dataset, resumed from its checkpoint


def test_a_killed_run_resumes_from_its_last_checkpoint_in_the_same_log(tiny_dataset, tmp_path, monkeypatch):
    # A run checkpoints when mu is trained (update 0) and at updates 10, 20 and 30. It is resumed from the
    # checkpoint at 10, as a run killed after logging update 30 whose later checkpoints never reached the disk:
    # the log keeps each point once (purge_step), mu's curve included (logged again past update 10).
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    monkeypatch.chdir(tmp_path)
    kept, save = {}, emaq.save_checkpoint

    def keep_each(path, learner, **info):
        kept[info["updates"]] = shutil.copy(save(path, learner, **info), tmp_path / f"at{info['updates']}.pt")
        return path

    monkeypatch.setattr(emaq, "save_checkpoint", keep_each)
    args = tiny_run(tiny_dataset[1], num_updates=30, save_model=True)
    m = emaq.train(args)
    assert sorted(kept) == [0, 10, 20, 30] and m["updates"] == 30 and math.isfinite(m["normalized_score"])
    assert math.isfinite(m["behavior_return"])  # mu alone, evaluated once before the Q loop
    assert m["mu_nll"] < 3 * math.log(40)  # mu has learned: below the uniform model over 40 bins in 3 dims
    resumed = emaq.train(replace(args, checkpoint_path=str(kept[10])))
    assert resumed["run_name"] == m["run_name"] and resumed["updates"] == 30 and math.isfinite(resumed["q_loss"])
    [run_dir] = Path("runs").iterdir()
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    steps = lambda tag: [e.step for e in ea.Scalars(tag)]  # noqa: E731
    assert steps("losses/q_loss") == steps("charts/eval_return") == [10, 20, 30]
    assert steps("losses/mu_nll") == [30] and steps("charts/behavior_return") == steps("charts/dataset_return") == [0]


def test_a_missing_dataset_is_one_line_naming_the_local_ones(tiny_dataset, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    with pytest.raises(SystemExit, match="--no-download.*minari download local/hopper/none-v0.*benchmarks/datasets.py; "
                                         "local datasets: mujoco/hopper/local-v0"):
        emaq.train(emaq.Args(dataset_id="local/hopper/none-v0", download=False, cuda=False))


# ------------------------------------------------------------ extreme settings: finite, or a loud stop


@pytest.mark.parametrize("flags", [dict(ensemble_lambda=0.0), dict(ensemble_lambda=1.0), dict(n_samples=1),
                                   dict(n_samples=64), dict(ema=0.0), dict(gamma=0.999), dict(n_bins=2),
                                   dict(n_bins=400), dict(mu_lr=1.0), dict(q_lr=1.0)])
def test_extreme_settings_keep_every_loss_finite(flags):
    torch.manual_seed(0)
    args = emaq.Args(batch_size=16, num_q=2, q_hidden=32, mu_embed=32, **flags)
    learner = emaq.make_learner(args, 3, emaq.gym.spaces.Box(-1, 1, (3,)), "cpu")
    with torch.no_grad():  # mu deems the first bin of each dimension all but impossible: ln p about -1000
        learner.behavior.heads[-1].bias[:, 0, 0] = -1e3
    action = torch.rand(64, 3) * 2 - 1
    action[:8], action[8:16] = -1.0, 1.0  # on the bounds: in the first bin, and in the last
    data = dict(obs=torch.randn(64, 3) * 10, next_obs=torch.randn(64, 3) * 10, action=action,
                reward=torch.randn(64) * 100, terminated=torch.rand(64) < 0.1)
    losses = [emaq.mu_step(args, emaq.sample(data, 16), learner) for _ in range(5)]
    losses += [emaq.q_step(args, emaq.sample(data, 16), learner) for _ in range(5)]
    assert torch.isfinite(torch.cat([x.reshape(-1) for x in losses])).all(), losses


@pytest.mark.parametrize("flags, message", [(dict(mu_lr=1e30), r"non-finite mu NLL at mu step 5$"),
                                            (dict(q_lr=1e30), r"non-finite Q loss at update 10 ")])
def test_a_non_finite_loss_stops_the_run(flags, message, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FloatingPointError, match=message):
        emaq.train(tiny_run(tiny_dataset[1], mu_steps=5, num_updates=10, eval_episodes=0, **flags))


def test_table_3s_network_sizes_reach_the_networks():
    args = emaq.Args(num_q=16, q_hidden=256, q_layers=4, mu_embed=256, mu_embed_layers=4, mu_hidden=128, mu_layers=1,
                     n_bins=80)
    learner = emaq.make_learner(args, 5, emaq.gym.spaces.Box(-1, 1, (3,)), "cpu")
    shapes = lambda net: [tuple(m.weight.shape) for m in net if hasattr(m, "weight")]  # noqa: E731
    assert shapes(learner.behavior.embed) == [(256, 5)] + [(256, 256)] * 4  # 4 hidden layers, then the embedding
    assert shapes(learner.behavior.heads) == [(3, 256 + 3, 128), (3, 128, 80)]  # 1 hidden layer, 80 bins
    assert shapes(learner.q_ensemble.net) == [(16, 5 + 3, 256)] + [(16, 256, 256)] * 3 + [(16, 256, 1)]


def test_the_datasets_discounted_return_restarts_at_every_episode(tiny_dataset, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    import minari

    episodes = list(minari.load_dataset(tiny_dataset[1]).iterate_episodes())
    assert len(episodes) > 1
    to_go = [sum(0.9**k * r for k, r in enumerate(ep.rewards[t:])) for ep in episodes for t in range(len(ep.rewards))]
    _, info = emaq.load_dataset(emaq.Args(dataset_id=tiny_dataset[1], download=False, gamma=0.9), "cpu")
    assert info["discounted_return"] == pytest.approx(np.mean(to_go), rel=1e-9)
    assert info["dataset_return"] == pytest.approx(np.mean([ep.rewards.sum() for ep in episodes]), rel=1e-6)


def test_terminations_stored_as_integers_load_as_booleans(tmp_path, monkeypatch):
    # Some writers store terminations as 0 / 1 integers; ~1 is -2 and ~0 is -1, both "not terminated" to a
    # target that multiplies by ~terminated. Loaded as booleans, the terminal step stops bootstrapping.
    import datasets  # benchmarks/datasets.py

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs = np.zeros((4, 11), np.float32)
    episode = dict(observations=obs, actions=np.zeros((3, 3), np.float32), rewards=np.ones(3, np.float32),
                   terminations=np.array([0, 0, 1]), truncations=np.array([0, 0, 0]))
    datasets.write_dataset("local/hopper/ints-v0", [episode], "Hopper-v4", "integer terminations")
    data, _ = emaq.load_dataset(emaq.Args(dataset_id="local/hopper/ints-v0", download=False), "cpu")
    assert data["terminated"].dtype == torch.bool and data["terminated"].tolist() == [False, False, True]
    target = data["reward"] + 0.5 * (~data["terminated"]) * 10.0  # as emaq_target bootstraps
    assert target.tolist() == [6.0, 6.0, 1.0]
