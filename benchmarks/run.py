"""Run the papers' benchmark grids, one process per (script, env, flags, seed).

    python benchmarks/run.py qwr-table1 --dry-run        # print the grid
    python benchmarks/run.py qwr-table1 --seeds 1 2 --envs Walker2d-v4 Hopper-v4
    python benchmarks/run.py bitflip
    python benchmarks/run.py qwr-table1 --executor slurm --partition cpu --time 120   # one SLURM job per run

With --executor slurm every run of the grid is a job of one SLURM job array, sent
through submitit (pip install -r benchmarks/requirements.txt); --executor local
runs them as submitit's local jobs. A job that SLURM preempts or times out is
requeued and its run resumes from the script's last checkpoint; a run whose
script is killed inside its job (the OOM killer, a lost process) is started
again from there, up to --retries times. Jobs write into the same work and
results directories as local runs, which must then be on a filesystem the
cluster's nodes share; submitit's logs go to <work>/submitit.

Every run works in a directory of its own outside git, $RL_BENCHMARKS_WORK/<run>
(default ~/.cache/rl-benchmarks), where it keeps its TensorBoard log, its
stdout and, for the scripts that can resume, a checkpoint at each evaluation.
A finished run's logs are copied into benchmarks/results/ (runs/, logs/), and
a marker in results/done/ records its command, wall time, date and machine.
--redo sets finished runs aside (results/superseded/) to be made again.
A grid survives the end of a session: runs with a marker are skipped, and a
run that was stopped part-way continues from its last checkpoint in the same
log directory the next time the grid is run (on the same machine). Two
run.py may work on one grid at once (say, one per --envs): a lock in each
run's work directory keeps a run to one of them. As many runs go at once as
--jobs says (default: one per CPU core), each with
cores / jobs torch threads. benchmarks/report.py turns the results into
tables and plots.
"""

import argparse
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # report.py, beside this file
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("RL_BENCHMARKS_WORK") or Path.home() / ".cache" / "rl-benchmarks")
# Scripts that checkpoint with --save-model to runs/<run>/<script>.pt, and resume from it with --checkpoint-path
# in the same run directory.
RESUMABLE = {"qwr_continuous.py", "qwr_atari.py", "awr_continuous.py", "iq_continuous.py", "emaq_offline.py"}
# Scripts with --compile (the rest compile by default or not at all).
COMPILABLE = RESUMABLE | {"qwr_offline.py"}

MUJOCO = ["HalfCheetah-v4", "Walker2d-v4", "Hopper-v4", "Humanoid-v4"]
ATARI = ["BoxingNoFrameskip-v4", "BreakoutNoFrameskip-v4", "FreewayNoFrameskip-v4",
         "GopherNoFrameskip-v4", "PongNoFrameskip-v4", "SeaquestNoFrameskip-v4"]
QWR_1M = ["--total-timesteps", "1000000", "--tau", "1.0", "--backup-scale", "std"]  # Appendix 6.1
IQ_100K = ["--total-timesteps", "100000"]
DATASETS = ["local/hopper/qwr-replay-v0", "local/hopper/qwr-medium-v0"]  # docs/qwr_offline.md: datasets
# EMaQ's N-effect (Fig. 1) at a size this CPU finishes (docs/emaq_offline.md): Pendulum-v1 datasets made by
# qwr_continuous.py, a medium policy's episodes and a training run's replay; 4 Q-networks, narrow networks (64 units),
# batch 100 as in Appendix G.2 (and 256 for N = 10 on the medium data), 60K updates (Q's mean is within a few % of
# where it settles).
# The -v1 datasets hold the executed (clipped) actions; the -v0 ones (results kept, datasets not) the sampled ones.
DATASETS_N = ["local/pendulum/qwr-medium-v1", "local/pendulum/qwr-replay-v1"]
DATASETS_N_V0 = ["local/pendulum/qwr-medium-v0", "local/pendulum/qwr-replay-v0"]
EMAQ_N = ["--num-q", "4", "--q-hidden", "64", "--mu-embed", "64", "--mu-hidden", "64", "--mu-steps", "5000",
          "--num-updates", "60000", "--eval-every", "5000", "--no-download"]
# The authors' settings that the defaults lack (Trax code; docs/results.md, the pilot): the env gets the sampled
# action unclipped, gradient norms clipped at 50, the critic's last layer starts at U(+-0.01). With --obs-clip 0,
# their whole system.
AUTHORS = ["--clip-actions", "none", "--max-grad-norm", "50", "--critic-head-init", "0.01"]
# The defaults before Table 1's runs chose today's (docs/results.md): the env clips the action, the critic sees it
# raw, the normalised observation is not clipped.
EARLIER_DEFAULTS = ["--clip-actions", "env", "--obs-clip", "0"]
# The authors' later Trax configuration of QWR (critic lr 1e-3, target synced every 50 critic steps, 100K buffer).
QWR_TRAX = ["--backup", "lse", "--critic-lr", "1e-3", "--target-update-every", "50", "--buffer-size", "100000"]
# EMaQ at Table 2's sizes needs a GPU (2.6 s per N = 10 update on one thread of this CPU); this fits a CPU.
EMAQ_CPU = ["--q-hidden", "256", "--mu-embed", "256", "--mu-steps", "5000", "--num-updates", "1000",
            "--eval-every", "250", "--eval-episodes", "5"]

# EMaQ's D4RL grid on Minari's copies of the datasets (downloaded on first use; needs a GPU at these sizes).
# Fig. 1 and 2 (MuJoCo): Table 2's settings (the defaults), N swept as in Fig. 1; Minari has D4RL's "medium" data,
# re-collected on the -v5 environments, and the paper gives these results as plots only.
EMAQ_MUJOCO = ["mujoco/halfcheetah/medium-v0", "mujoco/hopper/medium-v0", "mujoco/walker2d/medium-v0"]
# Table 1 (kitchen, antmaze, Adroit): Table 3's settings. mu's (256, 4, 128, 1, 128, 80) is embedding width and
# layers, per-dimension MLP width and layers, Lin_i's width (not implemented: emaq_offline.py's docstring), bins.
EMAQ_TABLE3 = ["--batch-size", "128", "--num-q", "16", "--q-hidden", "256", "--q-layers", "4", "--mu-embed", "256",
               "--mu-embed-layers", "4", "--mu-hidden", "128", "--mu-layers", "1", "--n-bins", "80"]
# Table 1's best N per dataset; the antmaze rows no N solved (the paper gives none) run at N = 100.
EMAQ_TABLE1 = {"D4RL/kitchen/complete-v2": 64, "D4RL/kitchen/partial-v2": 8, "D4RL/kitchen/mixed-v2": 8,
               "D4RL/antmaze/umaze-v1": 100, "D4RL/antmaze/umaze-diverse-v1": 50,
               "D4RL/antmaze/medium-play-v1": 100, "D4RL/antmaze/medium-diverse-v1": 100,
               "D4RL/antmaze/large-play-v1": 100, "D4RL/antmaze/large-diverse-v1": 100,
               "D4RL/door/cloned-v2": 64, "D4RL/hammer/cloned-v2": 64, "D4RL/pen/cloned-v2": 128,
               "D4RL/relocate/cloned-v2": 16}

# grid -> (method, script, extra flags, envs). The paper's tables report 5 seeds.
GRIDS = {
    "qwr-table1": [  # QWR paper Table 1: MuJoCo at 100K samples
        ("QWR-LSE", "qwr_continuous.py", ["--backup", "lse"], MUJOCO),
        # Table 1's ablations (docs/results.md). The earlier defaults: Walker2d and Humanoid fell short.
        ("QWR-LSE (env clips, critic raw, no obs clip)", "qwr_continuous.py", ["--backup", "lse", *EARLIER_DEFAULTS],
         MUJOCO),
        # The observation clip alone, which fixed Humanoid-v4.
        ("QWR-LSE (env clips, critic raw)", "qwr_continuous.py", ["--backup", "lse", "--clip-actions", "env"],
         ["Humanoid-v4"]),
        # The critic given the clipped action alone, which fixed Walker2d.
        ("QWR-LSE (no obs clip)", "qwr_continuous.py", ["--backup", "lse", "--obs-clip", "0"], ["Walker2d-v4"]),
        ("QWR-LSE (env clips, critic raw, Trax config, no obs clip)", "qwr_continuous.py",
         [*QWR_TRAX, *EARLIER_DEFAULTS], ["Hopper-v4"]),  # issue: the Hopper gap
        ("QWR-LSE (authors' system)", "qwr_continuous.py", ["--backup", "lse", *AUTHORS, "--obs-clip", "0"], MUJOCO),
        # Humanoid as gym's v2 on MuJoCo 2.0 saw it, with the contact forces cfrc_ext left out (they read 0 there).
        ("QWR-LSE (authors' system, no cfrc_ext)", "qwr_continuous.py",
         ["--backup", "lse", *AUTHORS, "--obs-clip", "0", "--env-kwargs", "include_cfrc_ext_in_observation", "False"],
         ["Humanoid-v5"]),
        ("QWR-LSE (authors' system, obs clip 10)", "qwr_continuous.py", ["--backup", "lse", *AUTHORS], ["Humanoid-v4"]),
        ("QWR-MAX", "qwr_continuous.py", ["--backup", "max"], MUJOCO),
        ("QWR-AVG", "qwr_continuous.py", ["--backup", "mean"], MUJOCO),
        ("AWR", "awr_continuous.py", [], MUJOCO),
    ],
    "qwr-table2": [  # QWR paper Table 2: Atari at 100K interactions
        ("QWR-LSE", "qwr_atari.py", ["--backup", "lse"], ATARI),
        ("QWR-MAX", "qwr_atari.py", ["--backup", "max"], ATARI),
        ("QWR-AVG", "qwr_atari.py", ["--backup", "mean"], ATARI),
    ],
    "qwr-table3": [  # QWR paper Table 3: MuJoCo at 1M samples
        ("QWR-LSE", "qwr_continuous.py", QWR_1M, MUJOCO),
        ("AWR", "awr_continuous.py", ["--total-timesteps", "1000000"], MUJOCO),
    ],
    "emaq": [  # EMaQ (N = 10 and 50) and offline QWR on Minari datasets made by qwr_continuous.py
        ("EMaQ N=10", "emaq_offline.py", ["--n-samples", "10"], DATASETS),
        ("EMaQ N=50", "emaq_offline.py", ["--n-samples", "50"], DATASETS),
        ("QWR-LSE offline", "qwr_offline.py", [], DATASETS),
    ],
    "emaq-cpu": [  # the same with small networks and 1000 updates: what 2 CPU cores fit beside other runs
        *((f"EMaQ N={n} (Q 256, mu 256 units, 1000 updates)", "emaq_offline.py", ["--n-samples", str(n), *EMAQ_CPU],
           DATASETS[1:]) for n in (10, 50)),
        ("QWR-LSE offline", "qwr_offline.py", [], DATASETS[1:]),
    ],
    "emaq-d4rl": [  # EMaQ paper Fig. 1-2 (MuJoCo) and Table 1 on Minari's D4RL datasets
        *((f"EMaQ N={n}", "emaq_offline.py", ["--n-samples", str(n)], EMAQ_MUJOCO)
          for n in (5, 10, 25, 50, 100, 200, 400)),
        *((f"EMaQ N={n} (Table 3)", "emaq_offline.py", ["--n-samples", str(n), *EMAQ_TABLE3], [dataset])
          for dataset, n in EMAQ_TABLE1.items()),
    ],
    "emaq-n": [  # EMaQ at N = 1 (mu itself), 5, 10 and 50, with offline QWR, on two datasets of different quality
        *((f"EMaQ N={n} (K 4, Q 64, mu 64 units, 60000 updates)", "emaq_offline.py",
           ["--n-samples", str(n), *EMAQ_N, "--batch-size", "100"], DATASETS_N) for n in (1, 5, 10, 50)),
        ("QWR-LSE offline", "qwr_offline.py", ["--no-download"], DATASETS_N),
        # Appendix I: a batch of 256 "largely resolved" the failures of large N.
        ("EMaQ N=10 (K 4, Q 64, mu 64 units, 60000 updates, batch 256)", "emaq_offline.py",
         ["--n-samples", "10", *EMAQ_N, "--batch-size", "256"], DATASETS_N[:1]),
    ],
    "iq": [  # IQ vs M-IQ vs the Gaussian-policy ablation (Fig. 2), at a 100K-step budget
        ("M-IQ", "iq_continuous.py", IQ_100K, ["HalfCheetah-v4", "Walker2d-v4"]),
        ("IQ", "iq_continuous.py", [*IQ_100K, "--alpha", "0"], ["HalfCheetah-v4", "Walker2d-v4"]),
        ("M-IQ-gaussian", "iq_continuous.py", [*IQ_100K, "--policy", "gaussian"], ["HalfCheetah-v4", "Walker2d-v4"]),
    ],
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}"


def runs_of(grid: str, seeds, envs, methods) -> list[dict]:
    """The grid's runs, filtered; bitflip is one run (its own sweep)."""
    if grid == "bitflip":
        return [dict(key="bitflip__sweep", script="benchmarks/bitflip_sweep.py", args=["--out-dir", "bitflip"])]
    runs = []
    for method, script, flags, grid_envs in GRIDS[grid]:
        for env in [e for e in envs if e in grid_envs] if envs else grid_envs:  # in the order asked for
            for seed in seeds:
                if methods and method not in methods:
                    continue
                env_flag = "--dataset-id" if script in ("emaq_offline.py", "qwr_offline.py") else "--env-id"
                runs.append(dict(key=f"{grid}__{method}__{env.replace('/', '-')}__{seed}", script=script,
                                 args=[env_flag, env, "--seed", str(seed), *flags], method=method, env=env))
    return runs


STARTING = threading.Lock()


def launch(run: dict, threads: int, work_root: Optional[Path] = None, results: Optional[Path] = None
           ) -> tuple[str, Optional[int], float]:
    """Run one benchmark to completion in its work directory, resuming it if it has a checkpoint;
    then copy its logs into benchmarks/results and write its marker. A run that another run.py
    holds (its work directory's lock), or that has finished meanwhile, is skipped: rc None.
    work_root and results: WORK and RESULTS, unless given (a submitit job carries them)."""
    WORK, RESULTS = work_root or globals()["WORK"], results or globals()["RESULTS"]  # noqa: N806
    work = WORK / run["key"]
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "lock", "w")  # held until this process lets go of it (or dies)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return run["key"], None, 0.0
    if (RESULTS / "done" / f"{run['key']}.json").is_file():
        return run["key"], None, 0.0
    args = list(run["args"])
    checkpoints = sorted(work.glob("runs/*/*.pt"))
    if run["script"] == "benchmarks/bitflip_sweep.py":
        args += ["--workers", str(threads)]  # its sweep's processes, one thread each
    if run["script"] in COMPILABLE:
        args.append("--compile")  # (compiled updates: the same numbers to rounding, faster)
    if run["script"] in RESUMABLE:
        args.append("--save-model")
        if checkpoints:
            args += ["--checkpoint-path", str(checkpoints[-1])]
            print(f"resuming {run['key']} from {checkpoints[-1]}", flush=True)
    command = [sys.executable, str(ROOT / run["script"]), *args]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.time()
    with open(work / "stdout.log", "a") as log:
        # A run's log directory is runs/{env}__{script}__{seed}__{unix second}: two runs that differ only
        # in flags (QWR-LSE and QWR-MAX, EMaQ N=10 and 50) must not start in the same second, or their logs
        # meet in results/runs. So new runs start one at a time, each once the previous one has made its
        # directory (a resumed run has its directory already).
        with STARTING:
            process = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
            (work / "pid").write_text(f"{process.pid}\n")  # the script's process, e.g. for `kill`
            while process.poll() is None and not any(work.glob("runs/*")):
                time.sleep(0.2)
            time.sleep(1.1)
        rc = process.wait()
    wall = time.time() - start
    if rc == 0:
        # Everything the run wrote but its checkpoints (TensorBoard logs, the BitFlip sweep's files).
        shutil.copytree(work, RESULTS, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.pt", "*.tmp", "stdout.log", "lock", "pid"))
        shutil.copy2(work / "stdout.log", RESULTS / "logs" / f"{run['key']}.log")
        marker = dict(command=" ".join(["python", run["script"], *run["args"]]), wall_seconds=round(wall, 1),
                      finished=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
                      threads=threads, resumed=bool(checkpoints))
        (RESULTS / "done" / f"{run['key']}.json").write_text(json.dumps(marker, indent=1) + "\n")
    return run["key"], rc, wall


class Job:
    """One run of a grid as a submitit job. Its script resumes from its last checkpoint wherever the run
    starts again: when SLURM preempts the job or its time runs out, submitit calls checkpoint() and
    requeues the job; when the script dies of a signal inside the job, it is started again at once."""

    def __init__(self, run: dict, threads: int, retries: int, work_root: Path, results: Path):
        self.run, self.threads, self.retries, self.work_root, self.results = run, threads, retries, work_root, results

    def __call__(self) -> tuple[str, Optional[int], float]:
        for _ in range(1 + self.retries):
            key, rc, wall = launch(self.run, self.threads, self.work_root, self.results)
            if rc is None or rc >= 0:  # finished, failed by itself (an error to read), or done elsewhere
                break
            print(f"{key}: the script was killed (signal {-rc}); starting it again from its checkpoint", flush=True)
        return key, rc, wall

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit(runs: list[dict], a: argparse.Namespace) -> list:
    """Send the runs through submitit, as one job array; returns the jobs."""
    try:
        import submitit
    except ImportError:
        sys.exit(f"error: --executor {a.executor} needs submitit: pip install -r benchmarks/requirements.txt")
    executor = submitit.AutoExecutor(folder=WORK / "submitit", cluster=a.executor)
    executor.update_parameters(name="rl-benchmarks", timeout_min=a.time, cpus_per_task=a.cpus_per_run,
                               gpus_per_node=a.gpus_per_run, slurm_partition=a.partition,
                               slurm_array_parallelism=a.array_parallelism,
                               slurm_additional_parameters=dict(requeue=True))
    with executor.batch():
        jobs = [executor.submit(Job(r, a.cpus_per_run, a.retries, WORK, RESULTS)) for r in runs]
    return jobs


def adopt(runs_dir: Path) -> None:
    """Take in finished runs made outside run.py (the scripts' own runs/ dirs):
    copy their TensorBoard logs (not checkpoints) and write their markers."""
    from report import read_run

    for path in sorted(p.parent for p in runs_dir.glob("*/events.out.tfevents*")):
        run = read_run(path)
        if run is None or not run["finished"]:
            print(f"skipped (unfinished or not a benchmark run): {path}")
            continue
        # The grids of its kind (e.g. emaq and emaq-cpu) that hold this (method, env): it is done in each of them.
        grids = [g for g, rows in GRIDS.items() if g.startswith(run["grid"])
                 and any(m == run["method"] and run["env"] in e for m, _, _, e in rows)]
        keys = [f"{g}__{run['method']}__{run['env'].replace('/', '-')}__{run['seed']}" for g in grids or [run["grid"]]]
        (RESULTS / "runs" / path.name).mkdir(parents=True, exist_ok=True)
        for f in path.glob("events.out.tfevents*"):
            shutil.copy2(f, RESULTS / "runs" / path.name / f.name)
        last_write = max(f.stat().st_mtime for f in path.glob("events.out.tfevents*"))
        marker = dict(hyperparameters=run["hp"], wall_seconds=round(run["wall_minutes"] * 60, 1), machine=machine(),
                      adopted_from=str(path),
                      finished=datetime.datetime.fromtimestamp(last_write).isoformat(timespec="seconds"))
        (RESULTS / "done").mkdir(parents=True, exist_ok=True)
        for key in keys:
            (RESULTS / "done" / f"{key}.json").write_text(json.dumps(marker, indent=1) + "\n")
        print(f"adopted {', '.join(keys)} from {path}")


def redo(keys: list[str], reason: str) -> None:
    """Move finished runs aside, to results/superseded/<run>/ with the reason (say, a bug fixed since),
    so that the next run of their grid makes them again from scratch (their work directories, with the
    final checkpoints, go to <work>/superseded/). report.py reads only results/runs: a run and its redo
    are never counted together."""
    for key in keys:
        marker, log = RESULTS / "done" / f"{key}.json", RESULTS / "logs" / f"{key}.log"
        if not marker.is_file():
            sys.exit(f"error: {key} has not finished (no {marker}); nothing to redo")
        aside = RESULTS / "superseded" / key
        if aside.exists():
            sys.exit(f"error: {aside} exists: a run is set aside once")
        (aside / "runs").mkdir(parents=True)
        # Its TensorBoard directories: named in its stdout ("logs in runs/<name>"), or the one it was adopted from.
        names = {line.split("logs in runs/")[1].split()[0] for line in log.read_text().splitlines()
                 if "logs in runs/" in line} if log.is_file() else set()
        if adopted := json.loads(marker.read_text()).get("adopted_from"):
            names.add(Path(adopted).name)
        for name in sorted(names):
            if (RESULTS / "runs" / name).is_dir():
                shutil.move(RESULTS / "runs" / name, aside / "runs" / name)
        if log.is_file():
            shutil.move(log, aside / "stdout.log")
        shutil.move(marker, aside / "done.json")
        (aside / "reason.txt").write_text(reason + "\n")
        if (WORK / key).is_dir():  # its final checkpoint, kept outside git; left in place, the grid would resume it
            (WORK / "superseded").mkdir(parents=True, exist_ok=True)
            shutil.move(WORK / key, WORK / "superseded" / f"{key}__{int(time.time())}")
        print(f"set aside {key} ({', '.join(sorted(names)) or 'no TensorBoard log'}): {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", nargs="?", choices=[*GRIDS, "bitflip"], help="which paper table (or figure) to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="seeds (paper: 5)")
    parser.add_argument("--envs", nargs="+", help="only these env ids (or dataset ids)")
    parser.add_argument("--methods", nargs="+", help="only these methods, e.g. QWR-LSE AWR")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: CPU cores / jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and what is done, run nothing")
    parser.add_argument("--adopt", type=Path, help="take in the finished runs of a runs/ directory made by hand "
                                                   "(same machine), instead of running a grid")
    parser.add_argument("--redo", nargs="+", metavar="RUN", help="set these finished runs (results/done/<RUN>.json) "
                        "aside, with --reason, so that their grid makes them again; run nothing")
    parser.add_argument("--reason", help="why --redo's runs are set aside (kept beside them)")
    cluster = parser.add_argument_group("SLURM (--executor slurm) and submitit's local executor")
    cluster.add_argument("--executor", choices=["processes", "slurm", "local"], default="processes",
                         help="processes: run here, --jobs at once (default); slurm: one SLURM job per run; "
                              "local: submitit's local jobs, all at once")
    cluster.add_argument("--partition", help="SLURM partition")
    cluster.add_argument("--time", type=int, default=240, help="minutes a job may run (a run resumes when requeued)")
    cluster.add_argument("--cpus-per-run", type=int, default=1, help="CPUs per job, and torch threads per run")
    cluster.add_argument("--gpus-per-run", type=int, default=0, help="GPUs per job")
    cluster.add_argument("--array-parallelism", type=int, default=64, help="jobs of the array running at once")
    cluster.add_argument("--retries", type=int, default=3, help="restarts of a script killed inside its job")
    a = parser.parse_args()
    if a.adopt:
        return adopt(a.adopt)
    if a.redo:
        if not a.reason:
            parser.error("--redo needs --reason")
        return redo(a.redo, a.reason)
    if a.grid is None:
        parser.error("name a grid (or --adopt a runs/ directory)")

    runs = runs_of(a.grid, a.seeds, a.envs, a.methods)
    if not runs:
        sys.exit("error: the filters leave no run in this grid (see --dry-run without them)")
    for sub in ("logs", "done", "runs"):
        (RESULTS / sub).mkdir(parents=True, exist_ok=True)
    missing = sorted({r["script"] for r in runs if not (ROOT / r["script"]).is_file()})
    done = {r["key"] for r in runs if (RESULTS / "done" / f"{r['key']}.json").is_file()}
    todo = [r for r in runs if r["key"] not in done and r["script"] not in missing]
    from report import paper_cell, paper_numbers

    paper = paper_numbers()
    for r in runs:
        status = "done" if r["key"] in done else "no script yet" if r["script"] in missing else "to run"
        theirs = f"  [paper {paper_cell(paper, a.grid, r['method'], r['env'])}]" if "method" in r else ""
        print(f"{status:>14}  python {r['script']} {' '.join(r['args'])}{theirs}")
    print(f"{len(runs)} runs: {len(done)} done, {len(todo)} to run"
          + (f", {sum(r['script'] in missing for r in runs)} waiting for {', '.join(missing)}" if missing else ""))
    if a.executor != "processes":
        print(f"{'would submit' if a.dry_run else 'submitting'} {len(todo)} runs to {a.executor} as one job array: "
              f"partition {a.partition or 'default'}, {a.time} min, {a.cpus_per_run} CPUs and {a.gpus_per_run} GPUs "
              f"per run, at most {a.array_parallelism} at once; logs in {WORK / 'submitit'}")
    if a.dry_run or not todo:
        return
    if a.executor != "processes":
        jobs = submit(todo, a)
        print("submitted: " + ", ".join(j.job_id for j in jobs[:3]) + (" ..." if len(jobs) > 3 else "")
              + "; run the same command with --dry-run to see which runs are done")
        if a.executor == "local":  # submitit's local jobs end with this process: wait for them
            failed = sum(j.result()[1] not in (0, None) for j in jobs)
            if failed:
                sys.exit(f"{failed} runs failed; see their logs in {RESULTS / 'logs'}")
        return
    jobs = max(1, min(a.jobs, len(todo)))
    threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"running {len(todo)} on {jobs} processes ({threads} torch threads each), working in {WORK}")
    failed = 0
    with ThreadPoolExecutor(jobs) as pool:
        for future in as_completed([pool.submit(launch, r, threads) for r in todo]):
            key, rc, wall = future.result()
            failed += rc not in (0, None)
            status = "skipped (another run.py runs it, or finished it)" if rc is None else "ok" if rc == 0 else f"FAILED ({rc})"
            print(f"{status}  {key}  {wall / 60:.1f} min", flush=True)
    if failed:
        sys.exit(f"{failed} runs failed; see their logs in {RESULTS / 'logs'}")


if __name__ == "__main__":
    main()
