"""The CUDA path of every script. Where a GPU is present, `python -m pytest` runs these: each
script's tiny run on the GPU (`--cuda`), eager and compiled, with every update step made to raise
if it waits for the host (a .item(), a copy to the CPU, a data-dependent shape: each one stalls
the GPU's queue), and compiled and eager losses from the same seed agreeing there. Where no GPU
is present they are skipped and the summary says so (conftest.py);
`python -m pytest tests/test_cuda.py --cuda-checks-on-cpu` runs their code on the CPU, where the
host-sync checks have nothing to catch."""

import math
import sys

import pytest
import torch

import awr_continuous
import bitflip
import emaq_offline
import iq_continuous
import qwr_atari
import qwr_continuous
import qwr_offline

pytestmark = pytest.mark.cuda
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOCAL = "mujoco/hopper/local-v0"  # conftest.py's tiny dataset: 200 Hopper steps
HOPPER = dict(env_id="Hopper-v4", batch_size=32, buffer_size=1000, eval_episodes=1, cuda=True)

# script: (its training function, a tiny run's flags, the metrics that must be finite, the losses compared)
RUNS = {
    "qwr": (qwr_continuous.train, HOPPER | dict(total_timesteps=200, steps_per_iteration=100, critic_steps=8,
                                                actor_steps=8, eval_every=1),
            ("critic_loss", "actor_loss", "q_mean", "eval_return", "eval_return_sampled")),
    "qwr-authors": (qwr_continuous.train, HOPPER | dict(total_timesteps=200, steps_per_iteration=100, critic_steps=8,
                                                        actor_steps=8, eval_every=1, clip_actions="none",
                                                        max_grad_norm=50.0, critic_head_init=0.01, obs_clip=0.0),
                    ("critic_loss", "actor_loss", "q_mean", "eval_return", "eval_return_sampled")),
    "qwr-offline": (qwr_offline.train, dict(dataset_id=LOCAL, download=False, iterations=2, critic_steps=8,
                                            actor_steps=8, batch_size=16, eval_every=1, eval_episodes=1, cuda=True),
                    ("critic_loss", "actor_loss", "q_mean", "eval_return")),
    "awr": (awr_continuous.train, HOPPER | dict(total_timesteps=200, samples_per_iteration=100, critic_steps=8,
                                                actor_steps=8, eval_every=1),
            ("critic_loss", "actor_loss", "value_mean", "eval_return")),
    "iq": (iq_continuous.train, HOPPER | dict(total_timesteps=300, learning_starts=100, eval_every=150),
           ("loss", "eval_return")),
    "atari": (qwr_atari.train, dict(env_id="PongNoFrameskip-v4", total_timesteps=200, steps_per_iteration=100,
                                    critic_steps=8, actor_steps=8, batch_size=8, buffer_size=500, eval_every=2,
                                    eval_episodes=1, max_episode_steps=40, cuda=True),
              ("critic_loss", "actor_loss", "eval_return")),
    "emaq": (emaq_offline.train, dict(dataset_id=LOCAL, download=False, mu_steps=30, num_updates=20, eval_every=10,
                                      eval_episodes=1, n_samples=2, num_q=2, q_hidden=32, mu_embed=32, batch_size=16,
                                      cuda=True),
             ("mu_nll", "q_loss", "q_mean", "eval_return")),
}
# The same, for the comparison of compiled and eager: one iteration (or window) of updates on data that
# the untrained policy collected, so that both paths learn from the same steps.
FIRST_UPDATES = {"qwr": dict(total_timesteps=100), "qwr-authors": dict(total_timesteps=100),
                 "awr": dict(total_timesteps=100), "iq": dict(total_timesteps=120), "atari": dict(total_timesteps=100),
                 "emaq": dict(num_updates=10), "qwr-offline": dict(iterations=1)}
LOSSES = {"qwr": ("critic_loss", "actor_loss"), "qwr-authors": ("critic_loss", "actor_loss"),
          "qwr-offline": ("critic_loss", "actor_loss"),
          "awr": ("critic_loss", "actor_loss"), "iq": ("loss",), "atari": ("critic_loss", "actor_loss"),
          "emaq": ("mu_nll", "q_loss")}


def no_host_sync(step, calls: list, warmup: int = 3):
    """step, made to raise where it waits for the GPU (torch's sync debug mode) after its first
    `warmup` calls, in which torch.compile compiles it; calls[0] counts the calls checked."""
    seen = 0

    def checked(*args, **kwargs):
        nonlocal seen
        seen += 1
        if seen <= warmup or not torch.cuda.is_available():
            return step(*args, **kwargs)
        calls[0] += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


def check_every_update(module, compile: bool, monkeypatch) -> list:
    """Make every update step of module's run raise where it waits for the host; returns, per step
    function, a counter of the calls checked."""
    checked = []

    def wrap(fn):
        checked.append([0])
        return no_host_sync(fn, checked[-1])

    if compile:  # (each script calls torch.compile(step) with --compile)
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: wrap(real_compile(fn, *a, **kw)))
    else:
        for name in [n for n in ("critic_step", "actor_step", "update_step", "mu_step", "q_step") if hasattr(module, n)]:
            monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    return checked


@pytest.fixture
def in_tmp_with_dataset(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("script", RUNS)
def test_a_tiny_run_on_the_gpu_whose_updates_never_wait_for_the_host(script, compile, in_tmp_with_dataset,
                                                                      monkeypatch, capsys):
    train, flags, finite = RUNS[script]
    module = sys.modules[train.__module__]
    checked = check_every_update(module, compile, monkeypatch)
    m = train(module.Args(**flags, compile=compile))
    assert f"{DEVICE})" in capsys.readouterr().out  # the run's first line names its device
    for key in finite:
        assert math.isfinite(m[key]), key
    assert checked and (not torch.cuda.is_available() or all(n > 0 for n, in checked)), checked


@pytest.mark.parametrize("script", RUNS)
def test_compiled_and_eager_updates_give_the_same_losses_on_the_gpu(script, in_tmp_with_dataset):
    # Compiled kernels sum in another order, and on a GPU some eager kernels are not deterministic
    # (atomic adds): the losses of a few updates agree to rounding, not bit for bit.
    train, flags, _ = RUNS[script]
    module = sys.modules[train.__module__]
    eager, fast = (train(module.Args(**(flags | FIRST_UPDATES[script] | dict(compile=c, eval_episodes=0, seed=3))))
                   for c in (False, True))
    for key in LOSSES[script]:
        assert fast[key] == pytest.approx(eager[key], rel=1e-3), key


def test_bitflip_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = bitflip.train(bitflip.Args(n_bits=4, iterations=2, steps_per_iteration=100, critic_steps=8, actor_steps=8,
                                   batch_size=32, hidden=32, eval_episodes=4, cuda=True))
    assert math.isfinite(m["eval_return"]) and math.isfinite(m["eval_return_sampled"])
