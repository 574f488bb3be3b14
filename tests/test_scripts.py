"""What every training script must do, checked on each: a tiny run with a
checkpoint, resuming from it, evaluating it; the same numbers from the same
seed; and a user's mistake reported in one line before any training."""

import math
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import awr_continuous
import emaq_offline
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


# Each run starts from a fresh torch.compile state, as a new process does. The state is process-wide: graphs,
# and which Python numbers (an optimizer's learning rate) dynamo has seen change and now takes as inputs, so a
# second compiled run in one process can get other kernels that round otherwise (awr's return_mean differed
# in the 7th digit after qwr and iq had compiled; with the reset, or in separate processes, it does not).
SAME_SEED = [(s, c, {}) for s in ("qwr", "awr", "iq") for c in (False, True)]


@pytest.mark.parametrize("script, compile, flags", SAME_SEED,
                         ids=[f"{s}-{'compiled' if c else 'eager'}{'-bf16' if f else ''}" for s, c, f in SAME_SEED])
def test_same_seed_same_numbers(script, compile, flags, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = TINY[script]
    steps = run.flags.get("learning_starts", 0) + 100

    def fresh_run():
        torch._dynamo.reset()
        return run.module.train(tiny(script, total_timesteps=steps, eval_every=100, compile=compile, **flags))

    a, b = fresh_run(), fresh_run()
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
    (script, overrides, message)
    for script in ("awr", "iq")
    for overrides, message in [
        (dict(eval_only=True), "--eval-only needs --checkpoint-path"),
        (dict(checkpoint_path="missing.pt"), "checkpoint not found"),
    ]
] + [
    ("qwr", dict(total_timesteps=150), "multiple of --steps-per-iteration"),
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
    with pytest.raises(getattr(module, "UsageError", SystemExit), match=re.escape(message)):
        module.train(tiny(script, **overrides))


@pytest.mark.parametrize("script", ["qwr_continuous.py", "awr_continuous.py", "iq_continuous.py"])
def test_discrete_env_exits_with_a_one_line_error(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--env-id", "CartPole-v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {script} needs a {'bounded ' if script.startswith('qwr') else ''}continuous (Box) action space, "
        "but CartPole-v1 has Discrete(2)")


def test_bitflip_rejects_an_impossible_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bitflip.py"), "--n-bits", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --n-bits must be >= 1"


# ------------------------------------------------ interrupted runs, bad checkpoints (issue: long runs survive)


@dataclass
class Interruptible:
    """A tiny run, slow enough to be stopped part-way: its flags; the status line after which the
    signal is sent; the unit its stop message counts in; and where it logs its speed (the tag and
    every step, each once in a whole run) and its evaluations."""

    flags: list
    signal_after: str
    unit: str
    speed_tag: str
    logged: list
    evaluated: list


HOPPER = ["--env-id", "Hopper-v4", "--batch-size", "32", "--buffer-size", "1000", "--eval-episodes", "1", "--no-cuda"]
EVERY_100 = [100, 200, 300, 400]
# Runs of 4 iterations (or windows, or stretches) of 100 steps (or updates).
INTERRUPTIBLE = {
    "awr_continuous.py": Interruptible(
        [*HOPPER, "--total-timesteps", "400", "--samples-per-iteration", "100", "--critic-steps", "300",
         "--actor-steps", "300", "--eval-every", "4", "--no-compile"], "iter 1/", "iteration", "charts/SPS",
        EVERY_100, [400]),
    # One update per environment step after 100 random ones, evaluated at the end of each window.
    "iq_continuous.py": Interruptible(
        [*HOPPER, "--total-timesteps", "400", "--learning-starts", "100", "--eval-every", "100", "--no-compile"],
        "step 100/", "step", "charts/SPS", EVERY_100, EVERY_100),
    # 30 steps of mu, then 400 Q updates evaluated every 100, on the tiny_dataset fixture's data.
    "emaq_offline.py": Interruptible(
        ["--dataset-id", "mujoco/hopper/local-v0", "--mu-steps", "30", "--num-updates", "400", "--eval-every", "100",
         "--eval-episodes", "1", "--n-samples", "2", "--num-q", "2", "--q-hidden", "32", "--mu-embed", "32",
         "--batch-size", "16", "--no-cuda", "--no-compile"], "update 100/", "update", "charts/updates_per_second", EVERY_100,
        EVERY_100),
}


@pytest.mark.parametrize("script", INTERRUPTIBLE)
def test_a_signal_saves_the_run_and_the_printed_command_finishes_it_in_the_same_log(script, tmp_path, request):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, run = str(ROOT / script), INTERRUPTIBLE[script]
    # One thread: tiny networks gain nothing from more, and a busy machine slows a spinning second thread a lot.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if script == "emaq_offline.py":  # it reads the tiny_dataset fixture's data
        env |= {"MINARI_DATASETS_PATH": request.getfixturevalue("tiny_dataset")[0]}
    proc = subprocess.Popen([sys.executable, path, *run.flags], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # stop it in its second iteration, window or stretch
        if line.startswith(run.signal_after):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGINT, err
    # (the signal can land before or after the check that ends the first iteration)
    # (qwr_continuous.py: "in iteration 2, after 12 of 300 critic and 0 of 300 actor steps" inside one)
    stopped = re.match(rf"stopped by SIGINT (?:after {run.unit} (\d+)|in {run.unit} (\d+), after .+ steps), saved; "
                       rf"resume with: python \S+\.py .*--checkpoint-path=", last)
    # not past the run's end: a step (or update) before the last logged one, or an iteration of the run
    bound = run.logged[-1] if run.unit in ("step", "update") else len(run.logged)
    assert stopped and (int(stopped[1]) < bound if stopped[1] else int(stopped[2]) <= bound), last
    command = shlex.split(last.split("resume with: ", 1)[1])
    done = subprocess.run([sys.executable, path, *command[2:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    [run_dir] = list((tmp_path / "runs").iterdir())  # one run, one log directory
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert [e.step for e in ea.Scalars(run.speed_tag)] == run.logged
    assert [e.step for e in ea.Scalars("charts/eval_return")] == run.evaluated


SCRIPT_MODULES = {"awr": awr_continuous, "iq": iq_continuous, "emaq": emaq_offline}
# EMaQ's tiny run, on the tiny_dataset fixture's data.
EMAQ_TINY = dict(dataset_id="mujoco/hopper/local-v0", mu_steps=10, num_updates=10, eval_every=10, eval_episodes=1,
                 n_samples=2, num_q=2, q_hidden=32, mu_embed=32, batch_size=16, cuda=False, compile=False)
# The function each script calls once per gradient step, and a tiny run logged every 100 steps (or updates).
STEPPED = {
    "iq": ("update", dict(total_timesteps=400, learning_starts=100, eval_every=100, eval_episodes=0)),
    "emaq": ("emaq_target", dict(mu_steps=10, num_updates=400, eval_every=100, eval_episodes=0)),
}


@pytest.mark.parametrize("script", STEPPED)
def test_a_stop_between_two_logging_steps_leaves_them_to_the_resumed_run(script, tmp_path, monkeypatch, capsys,
                                                                       request):
    # The signal's timing, made exact: Stop.signal is set (as the handler sets it) in the 150th gradient step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    module, (name, flags) = SCRIPT_MODULES[script], STEPPED[script]
    if script == "emaq":
        monkeypatch.setenv("MINARI_DATASETS_PATH", request.getfixturevalue("tiny_dataset")[0])
        args = emaq_offline.Args(**(EMAQ_TINY | flags))
    else:
        args = tiny(script, **flags)
    monkeypatch.setattr(module.Stop, "signal", None)  # (and back to None after the test)
    step, calls = getattr(module, name), []

    def step_that_stops_at_150(*a, **k):
        calls.append(1)
        if len(calls) == 150:
            module.Stop.signal = signal.SIGINT
        return step(*a, **k)

    monkeypatch.setattr(module, name, step_that_stops_at_150)
    with pytest.raises(SystemExit) as stopped:
        module.train(args)
    assert stopped.value.code == 128 + signal.SIGINT
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"after {'step 249' if script == 'iq' else 'update 150'}, saved" in last, last  # (IQ learns from step 100)
    module.Stop.signal = None
    module.train(replace(args, checkpoint_path=shlex.split(last)[-1].split("=", 1)[1]))
    [run_dir] = list((tmp_path / "runs").iterdir())
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    loss = "losses/iq_loss" if script == "iq" else "losses/q_loss"
    assert [e.step for e in ea.Scalars(loss)] == [100, 200, 300, 400]  # the cut window once, by the resumed run

def bad_checkpoints(script: str, good: str, tmp_path: Path) -> list:
    """(file, flags of the run that loads it, the error's message) for each kind of bad checkpoint."""
    module = SCRIPT_MODULES[script]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    ckpt = torch.load(good, weights_only=False)
    torch.save(ckpt | {"script": "other_script.py"}, tmp_path / "other.pt")  # every key, but another script's
    torch.save({"actor": {}}, tmp_path / "partial.pt")  # (no "script", as in older checkpoints)
    net = next(k for k in module.Learner.SAVED if "opt" not in k)  # a network: make its first layer wider
    first = next(iter(ckpt[net]))
    ckpt[net][first] = torch.zeros(ckpt[net][first].shape[0] + 1, *ckpt[net][first].shape[1:])
    torch.save(ckpt, tmp_path / "wider.pt")
    cases = [
        ("notes.pt", {}, "notes.pt is not a checkpoint (UnpicklingError"),
        ("other.pt", {}, f"other.pt is not a checkpoint of {module.SCRIPT} (other_script.py)"),
        ("partial.pt", {}, f"partial.pt is not a checkpoint of {module.SCRIPT} ("),
        ("wider.pt", {}, f"wider.pt: its {net} does not fit this run's"),
    ]
    if script == "emaq":
        ckpt = torch.load(good, weights_only=False)
        ckpt["args"]["dataset_id"] = "local/walker2d/other-v0"
        torch.save(ckpt, tmp_path / "walker.pt")
        return cases + [("walker.pt", {}, "walker.pt was trained on local/walker2d/other-v0, not mujoco/hopper/local-v0"),
                        (good, dict(q_hidden=64), "has --q-hidden 32; pass the same")]
    cases += [(good, dict(env_id="Walker2d-v4"), "was trained on Hopper-v4, not Walker2d-v4"),
              (good, dict(buffer_size=2000), "resume with the checkpoint's --buffer-size")]
    return cases + {
        "awr": [],
        "iq": [(good, dict(n_bins=5), "its policy does not fit this run's"),
               (good, dict(policy="gaussian"), "was trained with a multicategorical policy, not gaussian")],
    }[script]


# Each script's tiny run that writes the good checkpoint: one iteration (window, stretch) of 100 steps (10 updates).
GOOD_RUN = {"awr": dict(total_timesteps=100, eval_every=1),
            "iq": dict(total_timesteps=100), "emaq": {}}


@pytest.mark.parametrize("script", SCRIPT_MODULES)
def test_bad_checkpoints_are_refused_in_one_line_naming_the_file_and_the_mismatch(script, tmp_path, monkeypatch,
                                                                                  request):
    monkeypatch.chdir(tmp_path)
    module = SCRIPT_MODULES[script]
    if script == "emaq":
        monkeypatch.setenv("MINARI_DATASETS_PATH", request.getfixturevalue("tiny_dataset")[0])
        make = lambda **overrides: emaq_offline.Args(**(EMAQ_TINY | overrides))
    else:
        make = lambda **overrides: tiny(script, **overrides)
    good = module.train(make(save_model=True, **GOOD_RUN[script]))["checkpoint"]
    for path, overrides, message in bad_checkpoints(script, good, tmp_path):
        with pytest.raises(module.UsageError, match=re.escape(message)) as error:
            module.train(make(checkpoint_path=str(path), **overrides))
        assert "\n" not in str(error.value) and Path(path).name in str(error.value)
