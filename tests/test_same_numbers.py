"""A rewrite of a script keeps its numbers: a short run of each script (fixed seed, eager, CPU)
logs the same losses and returns as the run recorded in tests/reference_numbers.json.

The reference was recorded from the scripts before a rewrite; where a change of the algorithm
changes the numbers on purpose, record again and say why in the commit:

    RECORD_REFERENCE=1 python -m pytest tests/test_same_numbers.py
"""

import importlib
import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REFERENCE = Path(__file__).with_name("reference_numbers.json")
RECORD = os.environ.get("RECORD_REFERENCE") == "1"
# Seconds and steps per second differ from run to run; everything else a script logs must not.
TIMING = ("charts/SPS", "charts/seconds_per_iteration", "charts/updates_per_second")
# Diagnostics the minimal-scripts rewrite took out of the scripts (the numbers that remain are compared).
REMOVED = dict(qwr_continuous=("diagnostics/q_spread", "diagnostics/weight_spread"),
               qwr_offline=("diagnostics/q_spread", "diagnostics/weight_spread", "diagnostics/mean_at_bound_fraction"))


def logged(run_dir: Path) -> dict:
    """Every scalar of a TensorBoard log but the timings: {tag: [[step, value], ...]}."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag not in TIMING}


HOPPER = dict(env_id="Hopper-v4", batch_size=32, buffer_size=1000, eval_episodes=2, cuda=False, compile=False)
DATASET = dict(dataset_id="mujoco/hopper/local-v0", cuda=False, compile=False)  # conftest.py's tiny dataset
# script: the flags of its short run
RUNS = {
    "qwr_continuous": HOPPER | dict(total_timesteps=300, steps_per_iteration=100, critic_steps=20, actor_steps=20,
                                    eval_every=1, clip_actions="env", obs_clip=0.0),  # the defaults it was recorded with
    "qwr_atari": dict(env_id="PongNoFrameskip-v4", total_timesteps=300, steps_per_iteration=100, critic_steps=5,
                      actor_steps=5, batch_size=8, buffer_size=500, eval_every=1, eval_episodes=1,
                      max_episode_steps=40, cuda=False, compile=False),
    "qwr_offline": DATASET | dict(iterations=3, critic_steps=20, actor_steps=20, batch_size=32, eval_every=1,
                                  eval_episodes=2),
    "awr_continuous": HOPPER | dict(total_timesteps=250, samples_per_iteration=100, critic_steps=8, actor_steps=8,
                                    eval_every=1),
    "iq_continuous": HOPPER | dict(total_timesteps=300, learning_starts=100, eval_every=150),
    "emaq_offline": DATASET | dict(mu_steps=30, num_updates=20, eval_every=10, eval_episodes=1, n_samples=2, num_q=2,
                                   q_hidden=32, mu_embed=32, batch_size=16),
    "bitflip": dict(algo="qwr", n_bits=6, iterations=3, steps_per_iteration=200, critic_steps=50, actor_steps=50,
                    batch_size=64, hidden=64, eval_episodes=50),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_short_run_logs_the_recorded_numbers(name, tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])  # conftest.py: 200 steps of qwr_continuous.py
    module = importlib.import_module(name)
    module.train(module.Args(**RUNS[name]))
    (run_dir,) = Path("runs").iterdir()
    got = logged(run_dir)
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    if RECORD:
        REFERENCE.write_text(json.dumps(reference | {name: got}, indent=0) + "\n")
        pytest.skip("recorded")
    expected = {tag: points for tag, points in reference[name].items() if tag not in REMOVED.get(name, ())}
    for tag, points in expected.items():
        assert tag in got, f"{name} no longer logs {tag}"
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-5, abs=1e-6), tag
