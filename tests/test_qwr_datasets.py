"""qwr_continuous.py's offline side: what it collects becomes a Minari dataset
with the right episode boundaries, the dataset reads back as a replay buffer
with mu = N(action taken, std), and QWR trains from it without the env."""

import math

import numpy as np
import pytest
import torch

import qwr_continuous as qwr


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
    eps = qwr.episodes_of([two_env_rollout()], np.array([-1.0]), np.array([1.0]))
    assert [len(e["rewards"]) for e in eps] == [2, 2, 2, 6]
    first, second, third, other = eps
    assert first["observations"][:, 0].tolist() == [0.0, 1.0, 1.5]  # T + 1, ending in the final one
    assert first["terminations"].tolist() == [False, True] and not first["truncations"].any()
    assert second["truncations"].tolist() == [False, True] and not second["terminations"].any()
    assert third["truncations"].tolist() == [False, True]  # still running when collection stopped
    assert other["observations"][0, 0] == 10.0 and other["truncations"][-1]
    assert first["actions"][:, 0].tolist() == [-1.0, -0.5]  # the executed (clipped) actions


def test_a_dataset_reads_back_as_a_buffer_with_mu_centred_on_the_taken_actions(datasets_dir):
    eps = qwr.episodes_of([two_env_rollout()], np.array([-1.0]), np.array([1.0]))
    for e in eps:  # give the episodes Hopper's shapes
        e["observations"] = np.repeat(e["observations"], 11, -1).astype(np.float32)
        e["actions"] = np.repeat(e["actions"], 3, -1).astype(np.float32)
    qwr.write_dataset("local/hopper/unit-v0", eps, "Hopper-v4", "unit test")
    buffer, env_spec, refs = qwr.load_dataset("local/hopper/unit-v0", False, 0.4, "cpu")
    d = {k: v[:, 0] for k, v in buffer.data.items()}
    assert env_spec.id == "Hopper-v4" and refs == pytest.approx((-20.272305, 3234.3)) and buffer.size == 12
    assert d["episode_end"].tolist() == [False, True] * 3 + [False] * 5 + [True]
    assert d["terminated"].nonzero().flatten().tolist() == [1]
    assert d["next_obs"][1, 0].item() == 1.5 and d["obs"][2, 0].item() == 2.0  # no crossing at the end
    assert torch.equal(d["mu_mean"], d["action"]) and torch.all(d["mu_std"] == 0.4)
    # mu at s' is centred on the action taken there; at an episode's end, on its last action.
    assert torch.equal(d["next_mu_mean"][0], d["action"][1]) and torch.equal(d["next_mu_mean"][1], d["action"][1])


def test_a_missing_dataset_lists_what_is_there_and_how_to_make_one(datasets_dir):
    with pytest.raises(qwr.UsageError) as error:
        qwr.load_dataset("local/walker2d/missing-v0", False, 0.4, "cpu")
    assert "local datasets: none" in str(error.value) and "--no-download" in str(error.value)
    assert "python qwr_continuous.py --env-id Hopper-v4 --save-dataset local/hopper/replay-v0" in str(error.value)


UPDATES = dict(critic_steps=4, actor_steps=4, batch_size=32, eval_every=2, eval_episodes=1, cuda=False, compile=False)
TINY = dict(env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, buffer_size=1000, **UPDATES)


def test_online_run_writes_both_datasets_then_trains_offline_from_one(datasets_dir):
    qwr.train(qwr.Args(**TINY, save_dataset="local/hopper/replay-v0", save_policy_dataset="local/hopper/policy-v0",
                       policy_dataset_episodes=3))
    buffer, _, _ = qwr.load_dataset("local/hopper/replay-v0", False, 0.4, "cpu")
    assert buffer.size == 200  # every step collected
    policy = qwr.load_dataset("local/hopper/policy-v0", False, 0.4, "cpu")[0]
    assert policy.data["episode_end"].sum() == 3
    # Both hold the executed actions: the Gaussian samples clipped to Hopper's bounds of +-1 (some reach them).
    for data in (buffer.data, policy.data):
        assert data["action"].abs().max() == 1.0
    m = qwr.train_offline(qwr.Args(**UPDATES, offline_dataset_id="local/hopper/replay-v0", offline_iterations=2))
    assert m["global_step"] == 2 and math.isfinite(m["critic_loss"])
    episodes = int(buffer.data["episode_end"].sum())  # the mean episode return of the 200 steps collected
    assert m["dataset_return"] == pytest.approx(float(buffer.data["reward"].sum()) / episodes)
    assert math.isfinite(m["normalized_score"]) and "Hopper-v4" in m["run_name"]  # the dataset's env
    offline = dict(UPDATES, offline_dataset_id="local/hopper/replay-v0")
    with pytest.raises(qwr.UsageError, match="--total-timesteps applies to online training only"):
        qwr.train_offline(qwr.Args(**offline, total_timesteps=5000))
    with pytest.raises(qwr.UsageError, match="--env-id Walker2d-v4 is not the dataset's environment, Hopper-v4"):
        qwr.train_offline(qwr.Args(**offline, env_id="Walker2d-v4"))
    with pytest.raises(qwr.UsageError, match="--offline-iterations applies to offline training only"):
        qwr.train(qwr.Args(**TINY, offline_iterations=5))
    with pytest.raises(qwr.UsageError, match="exists already"):
        qwr.train(qwr.Args(**TINY, save_dataset="local/hopper/replay-v0"))


def test_a_finished_checkpoint_writes_a_policy_dataset_without_training_more(datasets_dir):
    m = qwr.train(qwr.Args(**TINY, save_model=True))
    again = qwr.train(qwr.Args(**TINY, checkpoint_path=m["checkpoint"], save_policy_dataset="local/hopper/late-v0",
                               policy_dataset_episodes=2))
    assert "critic_loss" not in again  # no iteration was left to run
    assert qwr.load_dataset("local/hopper/late-v0", False, 0.4, "cpu")[0].data["episode_end"].sum() == 2
