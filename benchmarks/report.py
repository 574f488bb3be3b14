"""Turn benchmarks/results into tables against the papers and learning curves.

    python benchmarks/report.py                 # writes benchmarks/results/REPORT.md and PNGs
    python benchmarks/report.py --readme README.md   # and the README's Results section

It also writes benchmarks/results/DIAGNOSTICS.md: for every online QWR run that logged them, what
its policy and critic did at each evaluation (how a stuck run differs from one that escaped).

Reads every TensorBoard run under benchmarks/results/runs/ (what each run
is comes from its logged hyper-parameters), the BitFlip sweep's CSV, the
markers benchmarks/run.py leaves (machine and date), and the papers' numbers
in benchmarks/paper_results.csv. Works on partial results: unfinished runs
are counted apart and drawn in the curves. The score of a run is its last
deterministic evaluation (charts/eval_return); a cell is the median over
seeds +- half the interquartile range, as the QWR paper reports.
"""

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmarks/report.py: start -->", "<!-- benchmarks/report.py: end -->"
GRID_TITLES = {
    "qwr-table1": "QWR paper Table 1: MuJoCo, 100K environment steps",
    "qwr-table2": "QWR paper Table 2: Atari, 100K interactions",
    "qwr-table3": "QWR paper Table 3: MuJoCo, 1M environment steps",
    "iq": "IQ paper ablation (Fig. 2: M-IQ, IQ, Gaussian policy) at 100K environment steps",
    "emaq": "Offline: EMaQ and QWR on datasets made by qwr_continuous.py",
    "emaq-d4rl": "EMaQ paper Fig. 1-2 and Table 1: Minari's D4RL datasets (normalised scores)",
}
# What qwr_continuous.py logs at each iteration about its actor's batch (train_actor), and at each
# evaluation; DIAGNOSTICS.md's columns, in this order.
DIAGNOSTICS = {
    "charts/eval_return": "eval, deterministic",
    "charts/eval_return_sampled": "eval, sampled",
    "diagnostics/mean_at_bound_fraction": "policy means at or past a bound",
    "diagnostics/q_spread": "std of Q over the k actions",
    "diagnostics/weight_spread": "std of the weights over the k actions",
    "losses/q_mean": "mean Q",
    "losses/actor_loss": "actor loss",
}
# From bb3b27d to 6f04b38 (2026-11-23 20:35 to 2026-11-24 06:28 UTC) the critic took its action bounds
# from an unbounded space, so mean_at_bound_fraction read 0 whatever the policy did: not a measurement.
AT_BOUND_UNMEASURED = (1795466138, 1795501720)


def method_of(hp: dict) -> str:
    """The paper's name for a run, from its logged hyper-parameters."""
    script = hp.get("exp_name", "?")
    if script.startswith("qwr"):
        backup = {"lse": "LSE", "max": "MAX", "mean": "AVG"}.get(hp.get("backup", ""), hp.get("backup", "?"))
        trax = (hp.get("critic_lr"), hp.get("target_update_every"), hp.get("buffer_size")) == ("0.001", "50", "100000")
        system = obs = ""
        if script == "qwr_continuous" and not offline_dataset(hp):
            # Who clips the action, the gradient clip, the critic head's init, and the observation clip, named where
            # they differ from the defaults, or for the authors' system from theirs (no obs clip). Logs older than
            # these flags ran env, 0, 0 and no obs clip.
            settings = (hp.get("clip_actions", "both" if hp.get("critic_clips_actions") == "True" else "env"),
                        float(hp.get("max_grad_norm", 0)), float(hp.get("critic_head_init", 0)))
            system = SYSTEMS.get(settings, "clip actions {}, grad norm {:g}, head init {:g}".format(*settings))
            clip = float(hp.get("obs_clip", 0))
            if clip != (0 if system == "authors' system" else OBS_CLIP):
                obs = f"obs clip {clip:g}" if clip > 0 else "no obs clip"
        parts = [system, "Trax config" if trax else "", obs,
                 "no cfrc_ext" if "'include_cfrc_ext_in_observation': False" in hp.get("env_kwargs", "") else "",
                 "bf16 matmuls" if hp.get("bf16_matmuls") == "True" else ""]
        suffix = ", ".join(p for p in parts if p)
        return f"QWR-{backup}" + (f" ({suffix})" if suffix else "") + (" offline" if offline_dataset(hp) else "")
    if script == "iq_continuous":
        munchausen = float(hp.get("alpha", 0)) > 0
        if hp.get("residual") == "True":
            return "Trust-PCL" if munchausen else "PCL"
        return ("M-IQ" if munchausen else "IQ") + ("-gaussian" if hp.get("policy") == "gaussian" else "")
    if script == "emaq_offline":
        setting = (hp.get("q_hidden", "750"), hp.get("mu_embed", "750"), hp.get("num_updates", "1000000"))
        table3 = (hp.get("q_layers"), hp.get("num_q"), hp.get("n_bins"), setting) == ("4", "16", "80",
                                                                                     ("256", "256", "1000000"))
        # The K = 4 runs use Appendix G.2's batch of 100; another batch is named.
        named = hp.get("num_q", "8") != "8" and hp.get("batch_size", "100") != "100"
        batch = f", batch {hp['batch_size']}" if named else ""
        small = ("" if setting == ("750", "750", "1000000") else " (Table 3)" if table3
                 else " ({}Q {}, mu {} units, {} updates{})".format(
                     "" if hp.get("num_q", "8") == "8" else f"K {hp['num_q']}, ", *setting, batch))
        return f"EMaQ N={hp.get('n_samples', '?')}{small}"  # Table 2's setting has no suffix
    return {"awr_continuous": "AWR"}.get(script, script)


# The settings of qwr_continuous.py's critic and env named in a method: (clip_actions, max_grad_norm,
# critic_head_init) -> name; the defaults have none.
SYSTEMS = {("both", 0.0, 0.0): "", ("env", 0.0, 0.0): "env clips, critic raw", ("none", 50.0, 0.01): "authors' system"}
OBS_CLIP = 10.0  # qwr_continuous.py's default --obs-clip


def offline_dataset(hp: dict) -> str | None:
    """The Minari dataset an offline QWR run learned from (qwr_offline.py, or qwr_continuous.py's old offline mode)."""
    dataset = hp.get("dataset_id") if hp.get("exp_name") == "qwr_offline" else hp.get("offline_dataset_id")
    return dataset if dataset and dataset != "None" else None


def grid_of(hp: dict) -> str:
    steps, script = int(hp.get("total_timesteps", 0)), hp.get("exp_name", "")
    if offline_dataset(hp):
        return "emaq"
    if script == "qwr_atari":
        return "qwr-table2"
    if script == "emaq_offline" and hp.get("dataset_id", "").startswith(("D4RL/", "mujoco/")):
        return "emaq-d4rl"  # Minari's standard datasets
    if script in ("iq_continuous", "emaq_offline"):
        return {"iq_continuous": "iq", "emaq_offline": "emaq"}[script]
    if script in ("qwr_continuous", "awr_continuous"):
        return {100_000: "qwr-table1", 1_000_000: "qwr-table3"}.get(steps, f"{steps} steps")
    return script


def read_run(path: Path) -> dict | None:
    """One run directory -> what it is, its evaluation curve and its speed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    if "hyperparameters/text_summary" not in tags["tensors"] or "charts/eval_return" not in tags["scalars"]:
        return None
    text = ea.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    hp = dict(re.findall(r"^\|([^|]+)\|([^|]*)\|$", text, re.M))
    curve = [(e.step, e.value) for e in ea.Scalars("charts/eval_return")]
    q_curve = [(e.step, e.value) for e in ea.Scalars("losses/q_mean")] if "losses/q_mean" in tags["scalars"] else []
    # The x-axis is environment steps; offline it is Q-network updates (QWR logs iterations of critic_steps).
    total = int(hp.get("total_timesteps") or hp.get("num_updates") or 0)
    if offline_dataset(hp):
        per_iteration = int(hp.get("critic_steps", 1))
        iterations = int(hp.get("iterations") or hp["offline_iterations"])
        curve, total = [(s * per_iteration, v) for s, v in curve], iterations * per_iteration
        q_curve = [(s * per_iteration, v) for s, v in q_curve]
    final = {tag: ea.Scalars(tag)[-1].value for tag in ("charts/normalized_score", "charts/dataset_return",
                                                         "charts/eval_return_sampled", "charts/behavior_return",
                                                         "charts/dataset_discounted_return") if tag in tags["scalars"]}
    # The stochastic policy's returns while it trained, over the last tenth of the run.
    train = [e.value for e in ea.Scalars("charts/episodic_return")] if "charts/episodic_return" in tags["scalars"] else []
    train_steps = [e.step for e in ea.Scalars("charts/episodic_return")] if train else []
    late = [v for s, v in zip(train_steps, train) if s > 0.9 * total]
    # Wall time: a gap of over 30 minutes with nothing logged is a run stopped and resumed later, not counted.
    times = np.sort([e.wall_time for tag in tags["scalars"] for e in ea.Scalars(tag)])
    gaps = np.diff(times)
    sps = ea.Scalars("charts/SPS")[-1].value if "charts/SPS" in tags["scalars"] else float("nan")
    diagnostics = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in DIAGNOSTICS if tag in tags["scalars"]}
    if "diagnostics/mean_at_bound_fraction" in diagnostics:
        low, high = AT_BOUND_UNMEASURED
        diagnostics["diagnostics/mean_at_bound_fraction"] = {
            e.step: e.value for e in ea.Scalars("diagnostics/mean_at_bound_fraction") if not low <= e.wall_time <= high}
    return dict(
        grid=grid_of(hp), method=method_of(hp),
        env=hp.get("dataset_id") or offline_dataset(hp) or hp.get("env_id", "?"),
        seed=int(hp.get("seed", 0)), total=total, hp=hp, curve=curve, sps=sps, path=path,
        wall_minutes=gaps[gaps < 1800].sum() / 60, finished=curve[-1][0] >= total,
        score=final.get("charts/normalized_score"), dataset_return=final.get("charts/dataset_return"),
        sampled=final.get("charts/eval_return_sampled"), late_train_return=float(np.mean(late)) if late else None,
        behavior_return=final.get("charts/behavior_return"), q_curve=q_curve,
        discounted_return=final.get("charts/dataset_discounted_return"), diagnostics=diagnostics,
    )


def collect_runs(runs_dir: Path) -> list[dict]:
    """Every run, keeping per (grid, method, env, seed) the one that got furthest."""
    best: dict = {}
    for path in sorted(p.parent for p in runs_dir.glob("*/events.out.tfevents*")):
        run = read_run(path)
        if run is None:
            continue
        key = (run["grid"], run["method"], run["env"], run["seed"])
        if key not in best or run["curve"][-1][0] >= best[key]["curve"][-1][0]:
            best[key] = run
    return list(best.values())


def median_iqr(x) -> str:
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return f"{med:.0f} ± {(q3 - q1) / 2:.0f}" if len(x) > 1 else f"{med:.0f}"


REFERENCE_GRIDS = ("qwr-table1", "qwr-table3", "iq")  # MuJoCo grids: their tables get the two policies below
REFERENCES = ("zero action", "uniform random")


def reference_returns(env_id: str, episodes: int = 10) -> dict:
    """Mean return over `episodes` episodes of the policy that always outputs the zero action and of the
    uniformly random one (seeds 0..episodes-1): what a score must beat to mean anything. Cached in
    results/reference_returns.csv, so each env is played once."""
    import gymnasium as gym

    path = RESULTS / "reference_returns.csv"
    rows = list(csv.DictReader(open(path))) if path.is_file() else []
    found = {r["policy"]: float(r["mean_return"]) for r in rows if r["env"] == env_id}
    if len(found) == len(REFERENCES):
        return found
    env = gym.make(env_id)
    env.action_space.seed(0)
    for policy in REFERENCES:
        returns = []
        for episode in range(episodes):
            env.reset(seed=episode)
            total, done = 0.0, False
            while not done:
                action = np.zeros(env.action_space.shape) if policy == "zero action" else env.action_space.sample()
                _, reward, terminated, truncated, _ = env.step(action)
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
        found[policy] = float(np.mean(returns))
        rows.append(dict(env=env_id, policy=policy, episodes=episodes, mean_return=f"{found[policy]:.1f}",
                         std_return=f"{np.std(returns):.1f}"))
    env.close()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["env", "policy", "episodes", "mean_return", "std_return"])
        writer.writeheader()
        writer.writerows(rows)
    return found


def paper_numbers() -> dict:
    with open(ROOT / "benchmarks" / "paper_results.csv") as f:
        return {(r["grid"], r["method"], r["env"]): r for r in csv.DictReader(f)}


def paper_cell(paper: dict, grid: str, method: str, env: str) -> str:
    """The paper's number for (method, env), with the baselines the paper lists beside it."""
    cell = lambda r: f"{r['score']} ± {r['spread']}" if r["spread"] else r["score"] or "–"  # noqa: E731
    ours = paper.get((grid, method, env))
    others = [f"{m} {cell(paper[(grid, m, env)])}" for m in ("BC", "BCQ", "BEAR") if (grid, m, env) in paper]
    return (cell(ours) if ours else "–") + (f" ({', '.join(others)})" if others else "")


def plot_grid(grid: str, runs: list[dict], out: Path, paper: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({r["env"] for r in runs})
    offline = grid == "emaq"  # long method names, and budgets from hundreds to tens of thousands of updates
    fig, axes = plt.subplots(1, len(envs), figsize=((9 if offline else 4.5) * len(envs), 3.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for method in sorted({r["method"] for r in runs if r["env"] == env}):
            curves = [dict(r["curve"]) for r in runs if r["env"] == env and r["method"] == method]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            y = np.array([[c[s] for s in steps] for c in curves])
            seeds = f"{len(curves)} seed" + "s" * (len(curves) > 1)
            line = ax.plot(steps, np.median(y, 0), "o-", ms=3, label=f"{method} ({seeds})")[0]
            if len(curves) > 1:
                ax.fill_between(steps, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
            p = paper.get((grid, method, env))
            if p and p["score"]:  # the paper's median (and spread) where the paper reports it: at the budget
                total = max(r["total"] for r in runs if r["env"] == env and r["method"] == method)
                ax.errorbar([total], [float(p["score"])], yerr=[float(p["spread"] or 0)], fmt="*", ms=11, capsize=3,
                            color=line.get_color(), label=f"{method}, paper")
        if grid in REFERENCE_GRIDS:
            for policy, style in zip(REFERENCES, ("--", ":")):
                ax.axhline(reference_returns(env)[policy], ls=style, lw=1, color="grey", label=policy)
        ax.set(title=env, xlabel="Q-network updates" if offline else "environment steps", ylabel="eval return")
        if offline:
            data = [r["dataset_return"] for r in runs if r["env"] == env and r["dataset_return"] is not None]
            if data:
                ax.axhline(data[0], ls="--", color="grey", label="the dataset's mean episode return")
            ax.set_xscale("log")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        else:
            ax.legend(fontsize=8)
    fig.suptitle(f"{GRID_TITLES.get(grid, grid)} (median over seeds, band: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def short_name(method: str) -> str:
    """A grid method's short name: "EMaQ N=10 (K 4, ..., batch 256)" -> "EMaQ N=10, batch 256"."""
    return method.split(" (")[0] + (", batch " + method.split("batch ")[1].rstrip(")") if "batch " in method else "")


def n_effect_section(prefix: str, runs: list[dict]) -> list[str]:
    """EMaQ's N (Fig. 1) on the emaq-n grid's datasets: the final return against N, beside the dataset,
    mu alone and offline QWR; and Q's mean against the dataset's discounted returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from run import DATASETS_N, DATASETS_N_V0, GRIDS

    methods = [m for m, _, _, _ in GRIDS["emaq-n"]]
    sweep = [m for m in methods if m.startswith("EMaQ") and "batch" not in m]  # N's sweep, then the others
    methods = [*sweep, *(m for m in methods if m not in sweep)]
    ns = [int(m.split("=")[1].split()[0]) for m in sweep]
    done = [r for r in runs if r["method"] in methods and r["finished"]]
    datasets = [d for d in [*DATASETS_N, *DATASETS_N_V0] if any(r["env"] == d for r in done)]
    if not datasets:
        return []
    cell = lambda values: f"{median_iqr(values)} ({len(values)})" if values else "–"  # noqa: E731
    lines = ["### EMaQ's N (Fig. 1) on a CPU: Pendulum-v1 datasets made by qwr_continuous.py", "",
             "Final deterministic eval return (10 episodes), median ± IQR/2 over seeds (their number); "
             "μ alone is the behaviour model's own policy (EMaQ's N = 1 policy) before the Q loop. For scale: "
             + ", ".join(f"{k} {v:.0f}" for k, v in reference_returns("Pendulum-v1").items()) + " (10 episodes).", "",
             "| dataset | dataset: mean episode return | μ alone | "
             + " | ".join(f"EMaQ N={n}" for n in ns) + " | " + " | ".join(short_name(m) for m in methods[len(ns):]) + " |",
             "|---" * (3 + len(methods)) + "|"]
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        of = {m: [r for r in done if r["env"] == dataset and r["method"] == m] for m in methods}
        emaq_runs = [r for m in sweep for r in of[m]]
        # mu is fitted before N plays a part: one per seed, the same in each of that seed's runs.
        mu = list({r["seed"]: r["behavior_return"] for r in emaq_runs if r["behavior_return"] is not None}.values())
        data = next((r["dataset_return"] for r in emaq_runs if r["dataset_return"] is not None), None)
        finals = {m: [r["curve"][-1][1] for r in of[m]] for m in methods}
        lines.append(f"| {dataset} | {'–' if data is None else round(data)} | {cell(mu)} | "
                     + " | ".join(cell(finals[m]) for m in methods) + " |")
        ax, ran = axes[0][col], [(n, np.array(finals[m])) for n, m in zip(ns, methods) if finals[m]]
        for n, y in ran:  # the median, and the range over seeds
            ax.errorbar([n], [np.median(y)], yerr=[[np.median(y) - y.min()], [y.max() - np.median(y)]], fmt="o",
                        color="C0", capsize=3)
        ax.plot([n for n, _ in ran], [np.median(y) for _, y in ran], "-", color="C0", label="EMaQ (range: seeds)")
        qwr = finals["QWR-LSE offline"]
        for value, style, label in ((data, "--", "dataset"), (np.median(mu) if mu else None, ":", "μ alone"),
                                    (np.median(qwr) if qwr else None, "-.", "QWR-LSE offline")):
            if value is not None:
                ax.axhline(value, ls=style, color="grey", label=label)
        ax.set(title=dataset, xscale="log", xlabel="N", ylabel="final eval return")
        ax.legend(fontsize=8)
        ax = axes[1][col]  # convergence: Q's mean over training batches, median over seeds
        for m in methods:
            curves = [dict(r["q_curve"]) for r in of[m] if r["q_curve"]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, np.median([[c[s] for s in steps] for c in curves], 0), label=short_name(m))
        scale = next((r["discounted_return"] for r in emaq_runs if r["discounted_return"] is not None), None)
        if scale is not None:
            ax.axhline(scale, ls="--", color="grey", label="dataset's discounted return to go")
        ax.set(xlabel="Q-network updates", ylabel="mean Q on training batches")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "emaq-n.png", dpi=100)
    plt.close(fig)
    if any(d in DATASETS_N_V0 for d in datasets):
        lines += ["", "The `-v0` rows are the first datasets, kept for the record: their writer stored the sampled "
                  "actions, some outside the action range, where `-v1` stores the executed (clipped) ones."]
    return lines + ["", f"![EMaQ's N on Pendulum]({prefix}emaq-n.png)", ""]


def bitflip_section(prefix: str) -> list[str]:
    path = RESULTS / "bitflip" / "bitflip_sweep.csv"
    if not path.is_file():
        return ["### BitFlip (QWR paper Fig. 1)", "", "Not run yet: `python benchmarks/run.py bitflip`.", ""]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    by = defaultdict(list)  # (lr setting, algo, N) -> [(greedy, sampled)] over seeds
    for r in rows:
        by[(r.get("lrs", "1e-2"), r["algo"], int(r["n_bits"]))].append(
            (float(r["eval_return"]), float(r["eval_return_sampled"])))
    settings = [s for s in ("1e-2", "table4") if any(k[0] == s for k in by)]
    ns = sorted({n for *_, n in by})
    seeds = max(len(v) for v in by.values())
    seconds = [float(r["seconds"]) for r in rows]
    names = {"1e-2": "lr 1e-2 (both networks)", "table4": "Table 4's lr (actor 1e-4, critic 5e-4)"}
    out = ["### BitFlip (QWR paper Fig. 1)", "",
           f"Mean return of 10 games after 10 iterations, played greedily (the most likely action) / sampled "
           f"from the policy; mean over {seeds} seeds, [min, max] of the greedy return. The paper gives no "
           f"learning rate for BitFlip: both settings below keep every hyper-parameter shared by AWR and QWR. "
           f"{len(rows)} runs, {np.median(seconds):.0f} s each (median), {sum(seconds) / 60:.0f} CPU-minutes "
           f"in all.", "",
           "| N | optimum | " + " | ".join(f"{a}, {names[s]}" for s in settings for a in ("AWR", "QWR")) + " |",
           "|---" * (2 + 2 * len(settings)) + "|"]
    optimum = {int(r["n_bits"]): r["optimal_return"] for r in rows}
    for n in ns:
        cells = []
        for s in settings:
            for a in ("awr", "qwr"):
                greedy, sampled = np.array(by[(s, a, n)]).T
                cells.append(f"{greedy.mean():.1f} / {sampled.mean():.1f} [{greedy.min():.1f}, {greedy.max():.1f}]")
        out.append(f"| {n} | {optimum[n]} | " + " | ".join(cells) + " |")
    return out + ["", f"![BitFlip sweep]({prefix}bitflip/bitflip_sweep.png)", ""]


def table_row(grid: str, method: str, env: str, grid_runs: list[dict], paper: dict) -> str:
    runs = [r for r in grid_runs if r["method"] == method and r["env"] == env]
    done = sorted((r for r in runs if r["finished"]), key=lambda r: r["seed"])
    running = len(runs) - len(done)
    ours = median_iqr([r["curve"][-1][1] for r in done]) if done else "–"
    if done and all(r["score"] is not None for r in done):
        ours += f" (score {np.median([r['score'] for r in done]):.1f})"
    logged = [r["sampled"] for r in done if r["sampled"] is not None]  # runs older than the sampled evaluation lack it
    sampled = median_iqr(logged) if logged else "–"
    if logged and len(logged) < len(done):
        sampled += f" ({len(logged)} of {len(done)} seeds)"
    each = ", ".join(f"{r['curve'][-1][1]:.0f}" for r in done) or "–"
    late = [r["late_train_return"] for r in done if r["late_train_return"] is not None]
    train = median_iqr(late) if done and len(late) == len(done) else "–"
    seeds = f"{len(done)}" + (f" (+{running} running)" if running else "")
    theirs = paper_cell(paper, grid, method, env)
    if grid == "emaq" and done and done[0]["dataset_return"] is not None:
        theirs = f"{done[0]['dataset_return']:.0f}"
    wall = f"{np.median([r['wall_minutes'] for r in done]):.0f} min" if done else "–"
    sps = f"{np.median([r['sps'] for r in done]):.0f}" if done and grid != "emaq" else "–"
    return f"| {method} | {env} | {ours} | {sampled} | {each} | {train} | {seeds} | {theirs} | {wall} | {sps} |"


def diagnostics_report(runs: list[dict]) -> str:
    """DIAGNOSTICS.md: one table per online run that logged diagnostics/*, a row per evaluation."""
    lines = ["# What each QWR run did at its evaluations", "",
             "Written by benchmarks/report.py from the runs' TensorBoard logs. The diagnostics are those of "
             "the actor's last batch of the iteration that ends at the evaluation (qwr_continuous.py, "
             "`actor_step`): the fraction of policy means at or past the action bounds, and the std over "
             "the k sampled actions of one state of Q and of the advantage weights, averaged over states "
             "(the two spreads: runs made before the scripts' minimal rewrite, which dropped them). "
             "Some runs show no at-bound fraction: a bug, since fixed, made it read 0 while they ran "
             "(benchmarks/results/NOTES.md).", ""]
    logged = [r for r in runs if "diagnostics/mean_at_bound_fraction" in r["diagnostics"] and not offline_dataset(r["hp"])]
    for r in sorted(logged, key=lambda r: (r["grid"], r["env"], r["method"], r["seed"])):
        d = r["diagnostics"]
        lines += [f"## {r['method']}, {r['env']}, seed {r['seed']}{'' if r['finished'] else ' (not finished)'}",
                  f"`{r['path'].name}`", "", "| steps | " + " | ".join(DIAGNOSTICS.values()) + " |",
                  "|---" * (len(DIAGNOSTICS) + 1) + "|"]
        for step, _ in r["curve"]:
            cells = [("–" if step not in d.get(tag, {}) else f"{d[tag][step]:.0f}" if 100 <= abs(d[tag][step]) < 1e5
                      else f"{d[tag][step]:.3g}") for tag in DIAGNOSTICS]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report(prefix: str, runs: list[dict] | None = None) -> str:
    """The whole report as markdown, of runs (by default, those in results/runs); image paths start
    with prefix."""
    runs = collect_runs(RESULTS / "runs") if runs is None else runs
    paper = paper_numbers()
    markers = [json.loads(p.read_text()) for p in sorted((RESULTS / "done").glob("*.json"))]
    lines = []
    if markers:
        dates = sorted(m["finished"][:10] for m in markers)
        machines = sorted({m["machine"] for m in markers})
        lines += [f"Runs finished {dates[0]} to {dates[-1]} on: {'; '.join(machines)}.", ""]
    from run import DATASETS_N, DATASETS_N_V0

    for grid in sorted({r["grid"] for r in runs}):
        # (the emaq-n grid's Pendulum runs have a table of their own: n_effect_section)
        grid_runs = [r for r in runs if r["grid"] == grid and r["env"] not in (*DATASETS_N, *DATASETS_N_V0)]
        if not grid_runs:
            continue
        offline = grid == "emaq"  # compared with the dataset, not a paper's number
        lines += [f"### {GRID_TITLES.get(grid, grid)}", "",
                  f"| method | {'dataset' if offline else 'env'} | ours: final eval return, deterministic | "
                  f"sampled | each seed | training return, last 10% | seeds | "
                  f"{'dataset: mean episode return' if offline else 'paper'} | wall time per run | SPS |",
                  "|---" * 10 + "|"]
        for env in sorted({r["env"] for r in grid_runs}):
            for method in sorted({r["method"] for r in grid_runs if r["env"] == env}):
                lines.append(table_row(grid, method, env, grid_runs, paper))
            if grid in REFERENCE_GRIDS:
                for policy, value in reference_returns(env).items():
                    lines.append(f"| {policy} (10 episodes) | {env} | {round(value)} | | | | | | | |")
        png = f"{grid}.png"
        plot_grid(grid, grid_runs, RESULTS / png, paper)
        lines += ["", f"![{grid} learning curves]({prefix}{png})", ""]
    lines += n_effect_section(prefix, runs)
    lines += bitflip_section(prefix)
    not_run = sorted(set(GRID_TITLES) - {r["grid"] for r in runs})
    if not_run:
        lines += ["Not run yet: " + ", ".join(GRID_TITLES[g] for g in not_run)
                  + " (`python benchmarks/run.py <grid> --dry-run` lists them).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, help=f"also replace the block between {START} and {END} there")
    a = parser.parse_args()
    if not (RESULTS / "runs").is_dir() and not (RESULTS / "bitflip").is_dir():
        raise SystemExit(f"error: no results in {RESULTS}; run benchmarks/run.py first")
    runs = collect_runs(RESULTS / "runs")  # read once: reading every log takes most of the time
    (RESULTS / "REPORT.md").write_text("# Benchmark report\n\n" + report("", runs) + "\n")
    print(f"wrote {RESULTS / 'REPORT.md'}")
    (RESULTS / "DIAGNOSTICS.md").write_text(diagnostics_report(runs) + "\n")
    print(f"wrote {RESULTS / 'DIAGNOSTICS.md'}")
    if a.readme:
        text = a.readme.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"error: {a.readme} has no {START} ... {END} block to replace")
        head, rest = text.split(START, 1)
        body = report(str((RESULTS).relative_to(a.readme.resolve().parent)) + "/", runs)
        a.readme.write_text(head + START + "\n" + body + "\n" + END + rest.split(END, 1)[1])
        print(f"updated {a.readme}")


if __name__ == "__main__":
    main()
