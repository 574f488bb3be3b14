"""The BitFlip sweep of the QWR paper's Fig. 1: bitflip.py's AWR and QWR over N, seeds and two
learning-rate settings, one process per run with one torch thread each.

Writes to --out-dir bitflip_sweep.csv (a row per run as it finishes; a stopped sweep keeps its rows
and runs only the missing ones), bitflip_sweep.png, and prints a table. `benchmarks/run.py bitflip`
runs it and benchmarks/report.py reads its CSV; the flags of each run are bitflip.py's, as --run.*.

    python benchmarks/bitflip_sweep.py          # N = 2..30, 3 seeds, both learning rates: 120 runs
    python benchmarks/bitflip_sweep.py --n-bits 4 20 --seeds 1 --lrs 1e-2 --run.iterations 5
"""

import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bitflip  # noqa: E402

# (actor lr, critic lr) of each setting: the paper gives none for BitFlip (see bitflip.Args.actor_lr).
LR_SETTINGS = {"1e-2": (1e-2, 1e-2), "table4": (1e-4, 5e-4)}
KEYS = ["lrs", "algo", "n_bits", "seed", "eval_return", "eval_return_sampled", "train_return", "optimal_return",
        "seconds"]


@dataclass
class Args:
    n_bits: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 16, 20, 25, 30)  # values of N
    seeds: int = 3  # seeds 1..S per (learning rates, algorithm, N)
    lrs: tuple[Literal["1e-2", "table4"], ...] = ("1e-2", "table4")  # 1e-2 for both networks, or Table 4's rates
    workers: int = 0  # parallel processes (0: one per CPU core)
    out_dir: str = "runs/bitflip_sweep"  # where bitflip_sweep.csv and bitflip_sweep.png go
    # bitflip.py's flags for every run; the sweep sets algo, n_bits, seed and the learning rates itself.
    run: bitflip.Args = field(default_factory=lambda: bitflip.Args(track=False))


def train_one_thread(args: bitflip.Args) -> dict:
    torch.set_num_threads(1)  # one process per core
    return bitflip.train(args)


def sweep(args: Args) -> list[dict]:
    """Runs what the CSV lacks, appends a row per finished run; prints the table, draws the plot."""
    if args.seeds < 1 or not args.n_bits:
        raise SystemExit("error: the sweep needs --seeds >= 1 and values of --n-bits")
    for n in args.n_bits:
        bitflip.check_args(replace(args.run, n_bits=n))
    path = os.path.join(args.out_dir, "bitflip_sweep.csv")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [dict(r, n_bits=int(r["n_bits"]), seed=int(r["seed"]),
                         **{k: float(r[k]) for k in ("eval_return", "eval_return_sampled", "seconds")})
                    for r in csv.DictReader(f)]
    else:
        with open(path, "w") as f:
            f.write(",".join(KEYS) + "\n")
    done = {(r["lrs"], r["algo"], r["n_bits"], r["seed"]) for r in rows}
    grid = [(lrs, replace(args.run, algo=algo, n_bits=n, seed=seed, actor_lr=LR_SETTINGS[lrs][0],
                          critic_lr=LR_SETTINGS[lrs][1], track=False))
            for lrs in args.lrs for n in args.n_bits for seed in range(1, args.seeds + 1)
            for algo in ("awr", "qwr") if (lrs, algo, n, seed) not in done]
    workers = args.workers or os.cpu_count() or 1
    print(f"{len(grid)} runs on {workers} processes ({len(rows)} done already in {path})")
    start = time.time()
    with ProcessPoolExecutor(workers) as pool:
        for i, ((lrs, _), m) in enumerate(zip(grid, pool.map(train_one_thread, [g for _, g in grid]))):
            rows.append(m | dict(lrs=lrs))
            with open(path, "a") as f:
                f.write(",".join(str(rows[-1][k]) for k in KEYS) + "\n")
            print(f"[{i + 1}/{len(grid)}] lr {lrs} {m['algo']} N={m['n_bits']} seed={m['seed']}: return "
                  f"{m['eval_return']:.1f} greedy, {m['eval_return_sampled']:.1f} sampled ({m['seconds']:.1f} s)",
                  flush=True)

    def stats(lrs, algo, n, key):
        return np.array([m[key] for m in rows if (m["lrs"], m["algo"], m["n_bits"]) == (lrs, algo, n)])

    print(f"\nmean return of {args.run.eval_episodes} games after {args.run.iterations} iterations, greedy / "
          f"sampled, mean over {args.seeds} seeds ({(time.time() - start) / 60:.1f} min)")
    print("| N | optimum | " + " | ".join(f"{a} (lr {lrs})" for lrs in args.lrs for a in ("AWR", "QWR"))
          + " |\n" + "|---" * (2 + 2 * len(args.lrs)) + "|")
    for n in args.n_bits:
        cells = [f"{stats(lrs, a, n, 'eval_return').mean():.1f} / {stats(lrs, a, n, 'eval_return_sampled').mean():.1f}"
                 for lrs in args.lrs for a in ("awr", "qwr")]
        print(f"| {n} | {bitflip.optimal_return(n)} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array(args.n_bits)
    fig, axes = plt.subplots(1, len(args.lrs), figsize=(5 * len(args.lrs), 4), sharey=True, squeeze=False)
    for ax, lrs in zip(axes[0], args.lrs):
        for algo, color in (("awr", "tab:red"), ("qwr", "tab:blue")):
            for key, style, label in (("eval_return", "o-", "greedy"), ("eval_return_sampled", "s:", "sampled")):
                mean, lo, hi = (np.array([f(stats(lrs, algo, n, key)) for n in ns]) for f in (np.mean, np.min, np.max))
                ax.plot(ns, mean, style, color=color, label=f"{algo.upper()} {label}")
                if key == "eval_return":
                    ax.fill_between(ns, lo, hi, color=color, alpha=0.2)
        ax.plot(ns, [bitflip.optimal_return(n) for n in ns], "k--", lw=1, label="optimum")
        actor_lr, critic_lr = LR_SETTINGS[lrs]
        ax.set(xlabel="N (bits)", ylabel="mean return", title=f"actor lr {actor_lr:g}, critic lr {critic_lr:g}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"BitFlip, {args.seeds} seeds (band: min-max of greedy)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "bitflip_sweep.png"), dpi=120)
    print(f"wrote {path} and bitflip_sweep.png")
    return rows


if __name__ == "__main__":
    sweep(tyro.cli(Args))
