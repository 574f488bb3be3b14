"""qwr_continuous.py's replay buffer, data collection and command line: episode
boundaries, the stored sampling policy, smoke runs, checkpoints, errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qwr_continuous as qwr

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(**overrides) -> qwr.Args:
    base = dict(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=8,
                actor_steps=8, batch_size=32, buffer_size=1000, eval_every=1, eval_episodes=2, cuda=False)
    return qwr.Args(**(base | overrides))


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


def test_smoke_run_checkpoint_resume_and_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = qwr.train(tiny_args(save_model=True))
    for key in ("critic_loss", "actor_loss", "q_mean", "target_mean", "eval_return", "sps"):
        assert math.isfinite(m[key]), key
    assert m["global_step"] == 200 and Path(m["checkpoint"]).is_file()
    assert list(Path("runs", m["run_name"]).glob("events.out.tfevents*"))
    resumed = qwr.train(tiny_args(total_timesteps=300, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == 300 and math.isfinite(resumed["critic_loss"])
    ev = qwr.train(tiny_args(checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=3))
    assert len(ev["eval_returns"]) == 3 and ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"]))


def test_same_seed_same_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keys = ("critic_loss", "actor_loss", "q_mean", "eval_return")
    a, b = qwr.train(tiny_args(total_timesteps=100)), qwr.train(tiny_args(total_timesteps=100))
    assert [a[k] for k in keys] == [b[k] for k in keys]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="CartPole-v1"), "continuous (Box) action space"),
        (dict(env_id="NoSuchEnv-v0"), "cannot make env 'NoSuchEnv-v0'"),
        (dict(total_timesteps=150), "multiple of --steps-per-iteration"),
        (dict(tau=0.0), "--tau must be > 0"),
        (dict(td_lambda=1.5), "--td-lambda"),
        (dict(eval_only=True), "--eval-only needs --checkpoint-path"),
        (dict(checkpoint_path="missing.pt"), "checkpoint not found"),
    ],
)
def test_bad_input_is_a_usage_error_before_training(overrides, message):
    with pytest.raises(qwr.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        qwr.train(tiny_args(**overrides))


def test_discrete_env_exits_with_a_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "qwr_continuous.py"), "--env-id", "CartPole-v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: qwr_continuous.py needs a continuous (Box) action space, but CartPole-v1 has Discrete(2)"
    )
