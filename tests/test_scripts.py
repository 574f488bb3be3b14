"""What every training script must do, checked on each: a tiny run with a
checkpoint, resuming from it, evaluating it; the same numbers from the same
seed; and a user's mistake reported in one line before any training."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import awr_continuous
import iq_continuous
import qwr_continuous

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(env_id="Hopper-v4", batch_size=32, buffer_size=1000, eval_episodes=2, cuda=False)
# script -> (module, a tiny run, steps to resume to, metrics that must be finite)
TINY = {
    "qwr": (qwr_continuous, dict(total_timesteps=200, steps_per_iteration=100, critic_steps=8, actor_steps=8,
                                 eval_every=1), 300,
            ("critic_loss", "actor_loss", "q_mean", "target_mean", "eval_return", "sps")),
    # 250 steps in iterations of 100: the last iteration collects 50, with fewer updates.
    "awr": (awr_continuous, dict(total_timesteps=250, samples_per_iteration=100, critic_steps=8, actor_steps=8,
                                 eval_every=1), 350,
            ("critic_loss", "actor_loss", "value_mean", "return_mean", "eval_return", "sps")),
    "iq": (iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150), 450,
           ("loss", "eval_return", "sps")),
    "iq-gaussian": (iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150,
                                        policy="gaussian"), 450, ("loss", "eval_return", "sps")),
}


def tiny(script: str, **overrides):
    module, config = TINY[script][:2]
    return module.Args(**(COMMON | config | overrides))


@pytest.mark.parametrize("script", TINY)
def test_smoke_run_checkpoint_resume_and_eval(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, config, resume_to, finite = TINY[script]
    m = module.train(tiny(script, save_model=True))
    for key in finite:
        assert math.isfinite(m[key]), key
    assert m["global_step"] == config["total_timesteps"] and Path(m["checkpoint"]).is_file()
    assert list(Path("runs", m["run_name"]).glob("events.out.tfevents*"))
    resumed = module.train(tiny(script, total_timesteps=resume_to, checkpoint_path=m["checkpoint"]))
    assert resumed["global_step"] == resume_to and math.isfinite(resumed[finite[0]])
    ev = module.train(tiny(script, checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=3))
    assert len(ev["eval_returns"]) == 3 and ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"]))


@pytest.mark.parametrize("script", ["qwr", "awr", "iq"])
def test_same_seed_same_numbers(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, config, _, finite = TINY[script]
    steps = config.get("learning_starts", 0) + 100
    a, b = (module.train(tiny(script, total_timesteps=steps, eval_every=100)) for _ in range(2))
    assert [a[k] for k in finite[:-1]] == [b[k] for k in finite[:-1]]  # all but the speed


BAD_INPUT = [
    (script, overrides, message)
    for script in ("qwr", "awr", "iq")
    for overrides, message in [
        (dict(env_id="CartPole-v1"), "continuous (Box) action space"),
        (dict(env_id="NoSuchEnv-v0"), "cannot make env 'NoSuchEnv-v0'"),
        (dict(eval_only=True), "--eval-only needs --checkpoint-path"),
        (dict(checkpoint_path="missing.pt"), "checkpoint not found"),
    ]
] + [
    ("qwr", dict(total_timesteps=150), "multiple of --steps-per-iteration"),
    ("qwr", dict(tau=0.0), "--tau must be > 0"),
    ("qwr", dict(td_lambda=1.5), "--td-lambda"),
    ("awr", dict(num_envs=3), "multiple of --num-envs"),
    ("awr", dict(gamma=1.0), "--gamma must be in (0, 1)"),
    ("awr", dict(actor_lr=0.0), "--actor-lr and --action-std must be > 0"),
    ("iq", dict(alpha=1.5), "--alpha must be in [0, 1]"),
    ("iq", dict(tau=0.0), "--tau must be > 0"),
    ("iq", dict(n_bins=1), "--n-bins must be >= 2"),
    ("iq", dict(learning_starts=10), "--learning-starts must be >= --batch-size"),
]


@pytest.mark.parametrize("script, overrides, message", BAD_INPUT)
def test_bad_input_is_a_usage_error_before_training(script, overrides, message):
    module = TINY[script][0]
    with pytest.raises(module.UsageError, match=re.escape(message)):
        module.train(tiny(script, **overrides))


@pytest.mark.parametrize("script", ["qwr_continuous.py", "awr_continuous.py", "iq_continuous.py"])
def test_discrete_env_exits_with_a_one_line_error(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--env-id", "CartPole-v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {script} needs a continuous (Box) action space, but CartPole-v1 has Discrete(2)"
    )


def test_bitflip_rejects_an_impossible_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bitflip.py"), "--n-bits", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --n-bits must be >= 1"
