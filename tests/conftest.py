"""Shared fixtures: a tiny Minari dataset that the offline scripts' tests read; the cuda marker:
CUDA checks run where a GPU is present and are skipped, saying so, where not."""

import os
import sys
from pathlib import Path

import pytest
import torch

import qwr_continuous

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import datasets  # noqa: E402  (benchmarks/datasets.py)

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: one torch thread per worker, as many workers as cores
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """200 Hopper steps collected by qwr_continuous.py, written as the Minari dataset
    mujoco/hopper/local-v0: returns (the datasets directory for $MINARI_DATASETS_PATH, the id)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "datasets"))
        mp.chdir(root)
        datasets.replay("mujoco/hopper/local-v0", qwr_continuous.Args(
            env_id="Hopper-v4", total_timesteps=200, steps_per_iteration=100, critic_steps=2, actor_steps=2,
            batch_size=32, eval_episodes=0, cuda=False, compile=False,
            clip_actions="env", obs_clip=0.0))  # the defaults tests/reference_numbers.json was recorded with
    return str(root / "datasets"), "mujoco/hopper/local-v0"


def pytest_addoption(parser):
    parser.addoption("--cuda-checks-on-cpu", action="store_true",
                     help="run the tests marked cuda on the CPU: checks the tests' own code, not CUDA")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a check of the CUDA path; run where a GPU is present, else skipped")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.getoption("--cuda-checks-on-cpu"):
        return
    skip = pytest.mark.skip(reason="no GPU here: CUDA checks skipped")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line that says whether the CUDA checks ran, and where."""
    marked = [r for reports in terminalreporter.stats.values() for r in reports
              if getattr(r, "when", None) in ("call", "setup") and "cuda" in getattr(r, "keywords", {})]
    if not marked:
        return
    where = (torch.cuda.get_device_name() if torch.cuda.is_available() else
             "the CPU (--cuda-checks-on-cpu)" if config.getoption("--cuda-checks-on-cpu") else None)
    ran = len({r.nodeid for r in marked if not r.skipped})
    terminalreporter.write_line(f"CUDA checks: {ran} ran on {where}" if where else
                                f"CUDA checks: {len({r.nodeid for r in marked})} skipped, no GPU here")
