"""What every training script must do, checked on each: a tiny run with a
checkpoint, resuming from it, evaluating it; the same numbers from the same
seed; and a user's mistake reported in one line before any training."""

import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import awr_continuous
import iq_continuous
import qwr_continuous

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(env_id="Hopper-v4", batch_size=32, buffer_size=1000, eval_episodes=2, cuda=False)


@dataclass
class Tiny:
    """A script's tiny run: its flags, the total steps a resumed run goes on to, the metrics that must be finite."""

    module: ModuleType
    flags: dict
    resume_to: int
    finite: tuple


TINY = {
    "qwr": Tiny(qwr_continuous, dict(total_timesteps=200, steps_per_iteration=100, critic_steps=8, actor_steps=8,
                                     eval_every=1, compile=False), resume_to=300,
                finite=("critic_loss", "actor_loss", "q_mean", "target_mean", "eval_return", "sps")),
    # 250 steps in iterations of 100: the last iteration collects 50, with fewer updates.
    "awr": Tiny(awr_continuous, dict(total_timesteps=250, samples_per_iteration=100, critic_steps=8, actor_steps=8,
                                     eval_every=1, compile=False), resume_to=350,
                finite=("critic_loss", "actor_loss", "value_mean", "return_mean", "eval_return", "sps")),
    "iq": Tiny(iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150, compile=False),
               resume_to=450,
               finite=("loss", "eval_return", "sps")),
    "iq-gaussian": Tiny(iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150,
                                            policy="gaussian", compile=False), resume_to=450,
                        finite=("loss", "eval_return", "sps")),
}


def tiny(script: str, **overrides):
    return TINY[script].module.Args(**(COMMON | TINY[script].flags | overrides))


@pytest.mark.parametrize("script", TINY)
def test_smoke_run_checkpoint_resume_and_eval(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = TINY[script]
    module = run.module
    m = module.train(tiny(script, save_model=True))
    for key in run.finite:
        assert math.isfinite(m[key]), key
    assert m["global_step"] == run.flags["total_timesteps"] and Path(m["checkpoint"]).is_file()
    assert list(Path("runs", m["run_name"]).glob("events.out.tfevents*"))
    resumed = module.train(tiny(script, total_timesteps=run.resume_to, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == run.resume_to and all(math.isfinite(resumed[k]) for k in run.finite)
    if not hasattr(module.Args, "eval_only"):  # (the rewritten scripts evaluate only while they train)
        return
    ev = module.train(tiny(script, checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=3))
    assert len(ev["eval_returns"]) == 3 and ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"]))


@pytest.mark.parametrize("script", ["qwr", "awr", "iq"])  # (compiled steps: each script's test_compiled_*)
def test_same_seed_same_numbers(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = TINY[script]
    steps = run.flags.get("learning_starts", 0) + 100
    a, b = (run.module.train(tiny(script, total_timesteps=steps, eval_every=100)) for _ in range(2))
    same = [k for k in run.finite if k != "sps"]  # all but the speed
    assert [a[k] for k in same] == [b[k] for k in same]


BAD_INPUT = [
    (script, overrides, message)
    for script in ("qwr", "awr", "iq")
    for overrides, message in [
        (dict(env_id="CartPole-v1"), "continuous (Box) action space"),
        (dict(env_id="NoSuchEnv-v0"), "cannot make env 'NoSuchEnv-v0'"),
    ]
] + [
    ("qwr", dict(total_timesteps=150), "multiple of --steps-per-iteration"),
    ("awr", dict(num_envs=3), "multiple of --num-envs"),
    ("awr", dict(gamma=1.0), "--gamma must be in (0, 1)"),
    ("iq", dict(alpha=1.5), "--alpha must be in [0, 1]"),
    ("iq", dict(tau=0.0), "--tau must be > 0"),
    ("iq", dict(n_bins=1), "--n-bins must be >= 2"),
    ("iq", dict(learning_starts=10), "--learning-starts must be >= --batch-size"),
]


@pytest.mark.parametrize("script, overrides, message", BAD_INPUT)
def test_bad_input_is_a_usage_error_before_training(script, overrides, message):
    module = TINY[script].module
    with pytest.raises(getattr(module, "UsageError", SystemExit), match=re.escape(message)):
        module.train(tiny(script, **overrides))


@pytest.mark.parametrize("script", ["qwr_continuous.py", "awr_continuous.py", "iq_continuous.py"])
def test_discrete_env_exits_with_a_one_line_error(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--env-id", "CartPole-v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {script} needs a bounded continuous (Box) action space, but CartPole-v1 has Discrete(2)")


def test_bitflip_rejects_an_impossible_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bitflip.py"), "--n-bits", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --n-bits must be >= 1"
