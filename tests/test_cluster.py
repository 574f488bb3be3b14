"""benchmarks/run.py's grids through submitit (real submitit, its local executor): a tiny grid
submitted, finished (one run's script SIGKILLed inside its job, finishing from its checkpoint),
copied into the results and reported; and the sbatch script submitit writes for SLURM, read
from a stand-in `sbatch` (no cluster here)."""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks import report, run

submitit = pytest.importorskip("submitit")  # benchmarks/requirements.txt
TINY = ["--env-id", "Hopper-v4", "--steps-per-iteration", "100", "--critic-steps", "40", "--actor-steps", "40",
        "--batch-size", "32", "--buffer-size", "1000", "--eval-every", "2", "--eval-episodes", "1", "--no-cuda"]


@pytest.fixture
def grid_dirs(tmp_path, monkeypatch):
    """run.py's work and results directories in tmp_path (the jobs get them from their Job)."""
    for sub in ("runs", "logs", "done"):
        (tmp_path / "results" / sub).mkdir(parents=True)
    monkeypatch.setattr(run, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(run, "WORK", tmp_path / "work")
    return tmp_path


def options(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**dict(executor="local", partition=None, time=10, cpus_per_run=1, gpus_per_run=0,
                                     array_parallelism=4, retries=3) | overrides)


def tiny_run(seed: int, steps: int) -> dict:
    return dict(key=f"tiny__QWR-LSE__Hopper-v4__{seed}", script="qwr_continuous.py",
                args=[*TINY, "--total-timesteps", str(steps), "--seed", str(seed)])


def test_a_tiny_grid_through_submitits_local_executor_finishes_a_sigkilled_run_from_its_checkpoint(grid_dirs):
    # Two runs in one submission; the script of the first is SIGKILLed inside its job after its second iteration.
    killed, whole = tiny_run(1, 400), tiny_run(2, 200)
    jobs = run.submit([killed, whole], options())
    work = grid_dirs / "work" / killed["key"]
    deadline = time.time() + 300
    while not ((work / "stdout.log").is_file() and "iter 2/" in (work / "stdout.log").read_text()):
        assert time.time() < deadline and not jobs[0].done(), "the run never reached its second iteration"
        time.sleep(0.05)
    os.kill(int((work / "pid").read_text()), signal.SIGKILL)  # after iteration 2's checkpoint (the print follows it)
    assert [j.result()[1] for j in jobs] == [0, 0] and "starting it again from its checkpoint" in jobs[0].stdout()
    done = grid_dirs / "results" / "done"
    assert sorted(p.name for p in done.iterdir()) == [f"{killed['key']}.json", f"{whole['key']}.json"]
    assert json.loads((done / f"{killed['key']}.json").read_text())["resumed"]
    runs = report.collect_runs(grid_dirs / "results" / "runs")  # copied into the results, one log directory each
    assert sorted((r["seed"], r["finished"], r["curve"][-1][0]) for r in runs) == [(1, True, 400), (2, True, 200)]
    [killed_dir] = (grid_dirs / "results" / "runs").glob("*__1__*")
    acc = EventAccumulator(str(killed_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("charts/SPS")] == [100, 200, 300, 400]  # each step once
    assert list((grid_dirs / "work" / "submitit").glob("*_log.out"))  # submitit's logs beside the runs


def test_the_sbatch_script_for_a_grid_names_the_partition_time_and_resources(grid_dirs, monkeypatch, capsys):
    # Stand-ins for SLURM's commands: sbatch keeps the script it is given and answers as sbatch does;
    # submitit only looks for srun, which the job script would call on a node.
    bin_dir = grid_dirs / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {grid_dirs}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for command in ("sbatch", "srun"):
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "argv", ["run.py", "qwr-table1", "--methods", "QWR-AVG", "--seeds", "1", "2",
                                      "--executor", "slurm", "--partition", "cpu-long", "--time", "90",
                                      "--cpus-per-run", "2", "--gpus-per-run", "1", "--array-parallelism", "3"])
    run.main()
    assert "submitting 8 runs to slurm" in capsys.readouterr().out  # 4 envs x 2 seeds
    script = (grid_dirs / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=cpu-long", "#SBATCH --time=90", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --array=0-7%3", "#SBATCH --requeue"):
        assert line in script, line
    assert str(grid_dirs / "work" / "submitit") in script  # its logs in the grid's work directory
