"""What every training script must do, checked on each: a tiny run with a
checkpoint, resuming from it, evaluating it; the same numbers from the same
seed; and a user's mistake reported in one line before any training."""

import math
import re
import shlex
import signal
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
                                     eval_every=1), resume_to=350,
                finite=("critic_loss", "actor_loss", "value_mean", "return_mean", "eval_return", "sps")),
    "iq": Tiny(iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150), resume_to=450,
               finite=("loss", "eval_return", "sps")),
    "iq-gaussian": Tiny(iq_continuous, dict(total_timesteps=300, learning_starts=100, eval_every=150,
                                            policy="gaussian"), resume_to=450, finite=("loss", "eval_return", "sps")),
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
    ev = module.train(tiny(script, checkpoint_path=m["checkpoint"], eval_only=True, eval_episodes=3))
    assert len(ev["eval_returns"]) == 3 and ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"]))


@pytest.mark.parametrize("script", ["qwr", "awr", "iq"])
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
        (dict(eval_only=True), "--eval-only needs --checkpoint-path"),
        (dict(checkpoint_path="missing.pt"), "checkpoint not found"),
    ]
] + [
    ("qwr", dict(total_timesteps=150), "multiple of --steps-per-iteration"),
    ("qwr", dict(tau=0.0), "--tau must be > 0"),
    ("qwr", dict(td_lambda=1.5), "--td-lambda"),
    ("qwr", dict(offline_iterations=5), "--offline-iterations applies to offline training only"),
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
    module = TINY[script].module
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


# ------------------------------------------------ interrupted runs, bad checkpoints (issue: long runs survive)

# Tiny runs of 4 iterations of 100 steps, evaluated at the end, slow enough to be stopped in the second.
INTERRUPTIBLE = {
    "qwr_continuous.py": ["--env-id", "Hopper-v4", "--total-timesteps", "400", "--steps-per-iteration", "100",
                          "--critic-steps", "300", "--actor-steps", "300", "--batch-size", "32", "--buffer-size",
                          "1000", "--eval-every", "4", "--eval-episodes", "1", "--no-cuda", "--no-compile"],
    "qwr_atari.py": ["--env-id", "PongNoFrameskip-v4", "--total-timesteps", "400", "--steps-per-iteration", "100",
                     "--critic-steps", "40", "--actor-steps", "40", "--batch-size", "8", "--buffer-size", "500",
                     "--eval-every", "4", "--eval-episodes", "1", "--eval-episode-steps", "50",
                     "--train-episode-steps", "40", "--no-cuda"],
}


@pytest.mark.parametrize("script", INTERRUPTIBLE)
def test_a_signal_saves_the_run_and_the_printed_command_finishes_it_in_the_same_log(script, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, flags = str(ROOT / script), INTERRUPTIBLE[script]
    proc = subprocess.Popen([sys.executable, path, *flags], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # stop it during its second iteration
        if line.startswith("iter 1/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGINT, err
    # (the signal can land before or after the check that ends iteration 1)
    assert re.match(r"stopped by SIGINT after iteration [12], saved; resume with: python \S+\.py .*--checkpoint-path=",
                    last), last
    command = shlex.split(last.split("resume with: ", 1)[1])
    done = subprocess.run([sys.executable, path, *command[2:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    [run_dir] = list((tmp_path / "runs").iterdir())  # one run, one log directory
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert [e.step for e in ea.Scalars("charts/SPS")] == [100, 200, 300, 400]
    assert [e.step for e in ea.Scalars("charts/eval_return")] == [400]


def test_bad_checkpoints_are_refused_in_one_line_naming_the_file_and_the_mismatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = qwr_continuous.train(tiny("qwr", total_timesteps=100, save_model=True))["checkpoint"]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"script": "awr_continuous.py", "actor": {}}, tmp_path / "awr.pt")
    cases = [
        ("notes.pt", {}, "notes.pt is not a checkpoint (UnpicklingError"),
        ("awr.pt", {}, "awr.pt is not a checkpoint of qwr_continuous.py (awr_continuous.py)"),
        (good, dict(env_id="Walker2d-v4"), "was trained on Hopper-v4, not Walker2d-v4"),
        (good, dict(critic_head="linear"), "its critic does not fit this run's"),
        (good, dict(buffer_size=2000), "resume with the checkpoint's --buffer-size"),
    ]
    for path, overrides, message in cases:
        with pytest.raises(qwr_continuous.UsageError, match=re.escape(message)) as error:
            qwr_continuous.train(tiny("qwr", total_timesteps=200, checkpoint_path=str(path), **overrides))
        assert "\n" not in str(error.value) and Path(path).name in str(error.value)
