"""awr_continuous.py: TD(lambda) returns over stored trajectories, advantage
weights, the replay buffer's order, the normaliser, smoke runs and errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import awr_continuous as awr

ROOT = Path(__file__).resolve().parents[1]

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
    assert awr.authors_setting("Walker2d-v4") == dict(actor_lr=2.5e-5, action_std=0.4)
    assert awr.authors_setting("Hopper-v5")["actor_lr"] == 1e-4
    assert awr.authors_setting("Humanoid-v4")["action_std"] == 0.2
    assert awr.authors_setting("Pendulum-v1") == awr.AUTHORS_DEFAULT


def tiny_args(**overrides) -> awr.Args:
    base = dict(env_id="Hopper-v4", total_timesteps=250, samples_per_iteration=100, critic_steps=8,
                actor_steps=8, batch_size=32, buffer_size=1000, eval_every=1, eval_episodes=2, cuda=False)
    return awr.Args(**(base | overrides))


def test_smoke_run_checkpoint_resume_and_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = awr.train(tiny_args(save_model=True))
    for key in ("critic_loss", "actor_loss", "value_mean", "return_mean", "eval_return", "sps"):
        assert math.isfinite(m[key]), key
    # 250 steps in iterations of 100: the last one collects 50.
    assert m["global_step"] == 250 and Path(m["checkpoint"]).is_file()
    assert list(Path("runs", m["run_name"]).glob("events.out.tfevents*"))
    resumed = awr.train(tiny_args(total_timesteps=350, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == 350 and math.isfinite(resumed["critic_loss"])
    ev = awr.train(tiny_args(checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=3))
    assert len(ev["eval_returns"]) == 3 and ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"]))


def test_same_seed_same_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keys = ("critic_loss", "actor_loss", "value_mean", "eval_return")
    a, b = awr.train(tiny_args(total_timesteps=100)), awr.train(tiny_args(total_timesteps=100))
    assert [a[k] for k in keys] == [b[k] for k in keys]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="CartPole-v1"), "continuous (Box) action space"),
        (dict(env_id="NoSuchEnv-v0"), "cannot make env 'NoSuchEnv-v0'"),
        (dict(num_envs=3), "multiple of --num-envs"),
        (dict(gamma=1.0), "--gamma must be in (0, 1)"),
        (dict(actor_lr=0.0), "--actor-lr and --action-std must be > 0"),
        (dict(eval_only=True), "--eval-only needs --checkpoint-path"),
        (dict(checkpoint_path="missing.pt"), "checkpoint not found"),
    ],
)
def test_bad_input_is_a_usage_error_before_training(overrides, message):
    with pytest.raises(awr.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        awr.train(tiny_args(**overrides))


def test_discrete_env_exits_with_a_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "awr_continuous.py"), "--env-id", "CartPole-v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: awr_continuous.py needs a continuous (Box) action space, but CartPole-v1 has Discrete(2)"
    )
