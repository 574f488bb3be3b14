"""emaq_offline.py: the autoregressive behaviour model's likelihood and sampling,
the ensemble's target, and a run from a Minari dataset made by qwr_continuous.py."""

import math

import numpy as np
import pytest
import torch

import emaq_offline as emaq
import qwr_continuous as qwr

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


def test_target_takes_the_best_of_n_under_the_pessimistic_ensemble():
    class FakeQ:  # member k values an action a as (k + 1) * a_0
        def __call__(self, obs, action):
            return torch.stack([(k + 1) * action[:, 0] for k in range(3)])

    class FakeMu:  # proposes actions -1, 0, 2 for every state
        def sample(self, obs, n):
            return torch.tensor([[-1.0], [0.0], [2.0]]).expand(len(obs), n, 1)

    batch = dict(next_obs=torch.zeros(2, 1), reward=torch.tensor([1.0, 1.0]), terminated=torch.tensor([False, True]))
    # lambda = 1: min over members -> (-3, 0, 2); best of the three = 2.
    y = emaq.emaq_target(batch, FakeMu(), FakeQ(), 3, 1.0, 0.5)
    assert y.tolist() == [1.0 + 0.5 * 2.0, 1.0]
    # lambda = 0: max over members -> (-1, 0, 6).
    assert emaq.emaq_target(batch, FakeMu(), FakeQ(), 3, 0.0, 0.5)[0].item() == 1.0 + 0.5 * 6.0


def test_a_run_from_a_dataset_made_by_qwr(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    qwr.train(qwr.Args(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=2,
                       actor_steps=2, batch_size=32, eval_episodes=0, cuda=False,
                       save_dataset="local/hopper/tiny-v0"))
    args = emaq.Args(dataset_id="local/hopper/tiny-v0", mu_steps=30, num_updates=20, eval_every=10, eval_episodes=1,
                     n_samples=2, num_q=2, q_hidden=32, mu_embed=32, batch_size=16, cuda=False, save_model=True)
    m = emaq.train(args)
    assert m["updates"] == 20 and math.isfinite(m["q_loss"]) and math.isfinite(m["normalized_score"])
    assert m["mu_nll"] < 3 * math.log(40)  # mu has learned: below the uniform model over 40 bins in 3 dims
    ev = emaq.train(emaq.Args(**vars(args) | dict(checkpoint_path=m["checkpoint"], eval_only=True)))
    assert len(ev["eval_returns"]) == 1
    with pytest.raises(emaq.UsageError, match="--q-hidden 32; pass the same"):
        emaq.train(emaq.Args(**vars(args) | dict(checkpoint_path=m["checkpoint"], q_hidden=64)))
    with pytest.raises(emaq.UsageError, match="found: local/hopper/tiny-v0"):
        emaq.train(emaq.Args(dataset_id="local/hopper/none-v0", cuda=False))
