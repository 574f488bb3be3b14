"""awr_continuous.py: TD(lambda) returns over stored trajectories, advantage
weights, the replay buffer's order, the normaliser (its runs and errors:
test_scripts.py)."""

import math

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
