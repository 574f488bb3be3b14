"""Shared fixtures: a tiny Minari dataset that the offline scripts' tests read."""

import pytest

import qwr_continuous


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """200 Hopper steps collected by qwr_continuous.py, written as the Minari dataset
    mujoco/hopper/local-v0: returns (the datasets directory for $MINARI_DATASETS_PATH, the id)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "datasets"))
        mp.chdir(root)
        qwr_continuous.train(qwr_continuous.Args(
            env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=2, actor_steps=2,
            batch_size=32, eval_episodes=0, cuda=False, compile=False, save_dataset="mujoco/hopper/local-v0"))
    return str(root / "datasets"), "mujoco/hopper/local-v0"
