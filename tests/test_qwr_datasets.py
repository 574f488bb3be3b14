"""Offline QWR's data: what qwr_continuous.py collects becomes a Minari dataset with the right
episode boundaries (benchmarks/datasets.py), the dataset reads back in qwr_offline.py with
mu = N(action taken, std) at every state, and QWR trains from it without the env."""

import math

import minari
import numpy as np
import pytest
import torch

import datasets  # benchmarks/datasets.py (conftest.py puts benchmarks/ on the path)
import qwr_continuous as qwr
import qwr_offline


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "datasets"


def two_env_rollout():
    """6 steps of 2 envs. Env 0: terminated at step 1, truncated at 3, running at 5.
    Env 1: one episode, running. obs = 10 * env + step, next_obs = obs + 0.5."""
    t = torch.arange(6, dtype=torch.float32)[:, None] + torch.tensor([0.0, 10.0])
    ends = torch.zeros(6, 2, dtype=torch.bool)
    ends[[1, 3], 0] = True
    terminated = torch.zeros(6, 2, dtype=torch.bool)
    terminated[1, 0] = True
    return dict(obs=t[..., None], next_obs=t[..., None] + 0.5, action=(t[..., None] - 2.0) / 2,
                reward=t, terminated=terminated, episode_end=ends)


def test_collected_steps_become_episodes_with_true_final_observations():
    eps = datasets.episodes_of([two_env_rollout()], np.array([-1.0]), np.array([1.0]))
    assert [len(e["rewards"]) for e in eps] == [2, 2, 2, 6]
    first, second, third, other = eps
    assert first["observations"][:, 0].tolist() == [0.0, 1.0, 1.5]  # T + 1, ending in the final one
    assert first["terminations"].tolist() == [False, True] and not first["truncations"].any()
    assert second["truncations"].tolist() == [False, True] and not second["terminations"].any()
    assert third["truncations"].tolist() == [False, True]  # still running when collection stopped
    assert other["observations"][0, 0] == 10.0 and other["truncations"][-1]
    assert first["actions"][:, 0].tolist() == [-1.0, -0.5]  # the executed (clipped) actions


def hopper_shaped(episodes):
    for e in episodes:  # give the episodes Hopper's shapes
        e["observations"] = np.repeat(e["observations"], 11, -1).astype(np.float32)
        e["actions"] = np.repeat(e["actions"], 3, -1).astype(np.float32)
    return episodes


@pytest.mark.parametrize("integers", [False, True])
def test_a_dataset_reads_back_with_mu_centred_on_the_taken_actions(datasets_dir, integers):
    eps = hopper_shaped(datasets.episodes_of([two_env_rollout()], np.array([-1.0]), np.array([1.0])))
    for e in eps:  # some writers store terminations as integers: 0 / 1, whose ~ is -1 / -2, both "true"
        e["terminations"] = e["terminations"].astype(np.int64) if integers else e["terminations"]
    datasets.write_dataset("local/hopper/unit-v0", eps, "Hopper-v4", "unit test")
    d, spec, refs = qwr_offline.load_dataset(qwr_offline.Args(dataset_id="local/hopper/unit-v0", download=False), "cpu")
    assert spec.id == "Hopper-v4" and refs == pytest.approx((-20.272305, 3234.3)) and len(d["reward"]) == 12
    assert d["episode_end"].tolist() == [False, True] * 3 + [False] * 5 + [True]
    assert d["terminated"].dtype == torch.bool and d["terminated"].nonzero().flatten().tolist() == [1]
    assert d["next_obs"][1, 0].item() == 1.5 and d["obs"][2, 0].item() == 2.0  # no crossing at the end
    assert torch.equal(d["mu_mean"], d["action"]) and torch.all(d["mu_std"] == 0.4)
    # mu at s' is centred on the action taken there; at an episode's end, on its last action.
    assert torch.equal(d["next_mu_mean"][0], d["action"][1]) and torch.equal(d["next_mu_mean"][1], d["action"][1])
    # A slice stops at each episode's end; the dataset's last step is one, so no slice runs on into its first.
    s = qwr_offline.sample(d, 512, 3)
    assert torch.equal(s["last"], s["episode_end"]) and s["episode_end"][s["reward"] == 15.0].all()


def test_a_missing_dataset_is_one_line_saying_how_to_get_or_make_one(datasets_dir):
    with pytest.raises(SystemExit) as error:
        qwr_offline.train(qwr_offline.Args(dataset_id="local/walker2d/missing-v0", download=False, cuda=False))
    message = str(error.value.code)
    assert "\n" not in message and "no Minari dataset 'local/walker2d/missing-v0'" in message
    assert "minari download local/walker2d/missing-v0" in message and "benchmarks/datasets.py" in message


def test_replay_and_policy_datasets_of_a_run_then_offline_training_from_one(datasets_dir, monkeypatch):
    args = qwr.Args(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, buffer_size=1000,
                    critic_steps=4, actor_steps=4, batch_size=32, eval_episodes=0, save_model=True, cuda=False,
                    obs_clip=3.0)
    m = datasets.replay("local/hopper/replay-v0", args)
    clips, collect = [], qwr.collect

    def collect_noting_the_clip(envs, obs, horizon, actor, obs_norm, *rest):
        clips.append(obs_norm.clip)
        return collect(envs, obs, horizon, actor, obs_norm, *rest)

    monkeypatch.setattr(qwr, "collect", collect_noting_the_clip)
    datasets.policy("local/hopper/policy-v0", m["checkpoint"], 3, seed=5)
    assert clips == [3.0]  # the policy sees observations normalised as in training, clip included
    replay, policy = minari.load_dataset("local/hopper/replay-v0"), minari.load_dataset("local/hopper/policy-v0")
    assert replay.total_steps == 200 and policy.total_episodes == 3  # every step collected; 3 whole episodes
    # Both hold the executed actions: the Gaussian samples clipped to Hopper's bounds of +-1 (some reach them).
    for dataset in (replay, policy):
        actions = np.concatenate([ep.actions for ep in dataset.iterate_episodes()])
        assert np.abs(actions).max() == 1.0
    off = qwr_offline.Args(dataset_id="local/hopper/replay-v0", iterations=2, critic_steps=4, actor_steps=4,
                           batch_size=32, eval_every=2, eval_episodes=1, cuda=False)
    m = qwr_offline.train(off)
    assert m["global_step"] == 2 and math.isfinite(m["critic_loss"]) and math.isfinite(m["normalized_score"])
    rewards = [ep.rewards.sum() for ep in replay.iterate_episodes()]
    assert m["dataset_return"] == pytest.approx(np.mean(rewards), rel=1e-5) and "Hopper-v4" in m["run_name"]
