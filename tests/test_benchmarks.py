"""benchmarks/run.py's grids and benchmarks/report.py's reading of logs."""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

import qwr_continuous
from benchmarks import report, run


QWR = dict(exp_name="qwr_continuous", backup="lse", clip_actions="both", obs_clip="10.0")  # QWR-LSE's flags, as logged


def fake_run(root: Path, name: str, hp: dict, evals: list[tuple[int, float]], **scalars: float) -> None:
    writer = SummaryWriter(str(root / name))
    table = "\n".join(f"|{k}|{v}|" for k, v in hp.items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    for step, value in evals:
        writer.add_scalar("charts/eval_return", value, step)
        writer.add_scalar("charts/SPS", 50, step)
        for tag, v in scalars.items():
            writer.add_scalar(f"charts/{tag}", v, step)
    writer.close()


def test_grids_name_every_table_and_filter_by_env_method_and_seed():
    runs = run.runs_of("qwr-table1", [1, 2], ["Hopper-v4"], ["AWR", "QWR-LSE"])
    assert [r["key"] for r in runs] == [
        "qwr-table1__QWR-LSE__Hopper-v4__1", "qwr-table1__QWR-LSE__Hopper-v4__2",
        "qwr-table1__AWR__Hopper-v4__1", "qwr-table1__AWR__Hopper-v4__2"]
    assert runs[0]["script"] == "qwr_continuous.py" and runs[0]["args"][-2:] == ["--backup", "lse"]
    # methods x envs x seeds; the authors' system and the earlier defaults on every env; the Trax configuration on
    # Hopper, the authors' system with each observation of Humanoid, the critic given the raw action on Humanoid, no
    # observation clip on Walker2d
    assert len(run.runs_of("qwr-table1", [1, 2, 3, 4, 5], None, None)) == 4 * 4 * 5 + 2 * 4 * 5 + 5 + 5 + 5 + 5 + 5
    raw = run.runs_of("qwr-table1", [1], None, ["QWR-LSE (env clips, critic raw)"])
    assert [r["env"] for r in raw] == ["Humanoid-v4"] and raw[0]["args"][-2:] == ["--clip-actions", "env"]
    unclipped = run.runs_of("qwr-table1", [3], None, ["QWR-LSE (no obs clip)"])
    assert [r["env"] for r in unclipped] == ["Walker2d-v4"] and unclipped[0]["args"][-2:] == ["--obs-clip", "0"]
    authors = run.runs_of("qwr-table1", [1], None, ["QWR-LSE (authors' system, no cfrc_ext)"])
    assert [r["env"] for r in authors] == ["Humanoid-v5"] and authors[0]["args"][-3:] == [
        "--env-kwargs", "include_cfrc_ext_in_observation", "False"]
    # The report names each run as the grid does, from the hyper-parameters the script logs.
    for method, script, _, _ in run.GRIDS["qwr-table1"]:
        if script == "qwr_continuous.py":
            flags = run.runs_of("qwr-table1", [1], None, [method])[0]["args"]
            hp = {k: str(v) for k, v in asdict(tyro.cli(qwr_continuous.Args, args=flags)).items()}
            assert report.method_of(hp) == method
    assert run.runs_of("qwr-table3", [1], ["Walker2d-v4"], ["QWR-LSE"])[0]["args"][4:] == run.QWR_1M


def test_report_names_runs_from_their_hyper_parameters():
    assert report.method_of(QWR | {"backup": "mean"}) == "QWR-AVG"
    assert report.method_of({"exp_name": "awr_continuous"}) == "AWR"
    assert run.QWR_TRAX == ["--backup", "lse", "--critic-lr", "1e-3", "--target-update-every", "50",
                            "--buffer-size", "100000"]  # logged as the strings below
    trax = dict(exp_name="qwr_continuous", backup="lse", critic_lr="0.001", target_update_every="50",
                buffer_size="100000")
    # Named where they differ from today's defaults (the critic sees the clipped action, observations clipped at 10);
    # logs older than the flags carry the earlier defaults (env clips, critic raw, no clip).
    assert report.method_of(trax) == "QWR-LSE (env clips, critic raw, Trax config, no obs clip)"
    assert report.method_of(trax | dict(critic_lr="0.0005")) == "QWR-LSE (env clips, critic raw, no obs clip)"
    lse = dict(exp_name="qwr_continuous", backup="lse")
    assert report.method_of(lse | dict(clip_actions="both", obs_clip="10.0")) == "QWR-LSE"
    assert report.method_of(lse | dict(clip_actions="both", obs_clip="5.0")) == "QWR-LSE (obs clip 5)"
    assert report.method_of(lse | dict(obs_clip="10.0")) == "QWR-LSE (env clips, critic raw)"
    assert report.method_of(lse | dict(critic_clips_actions="True")) == "QWR-LSE (no obs clip)"
    assert report.method_of(lse | dict(critic_clips_actions="True", obs_clip="10.0")) == "QWR-LSE"
    assert report.method_of(lse | dict(clip_actions="none", max_grad_norm="50.0", critic_head_init="0.01",
                                       obs_clip="0.0")) == "QWR-LSE (authors' system)"
    assert report.method_of(lse | dict(bf16_matmuls="True")) == \
        "QWR-LSE (env clips, critic raw, no obs clip, bf16 matmuls)"
    # The offline and Atari scripts have none of these settings.
    assert report.method_of(dict(exp_name="qwr_offline", backup="lse", dataset_id="local/x/y-v0")) == "QWR-LSE offline"
    assert report.method_of(dict(exp_name="qwr_atari", backup="max")) == "QWR-MAX"
    assert report.grid_of({"exp_name": "qwr_continuous", "total_timesteps": "1000000"}) == "qwr-table3"
    assert report.grid_of({"exp_name": "awr_continuous", "total_timesteps": "100000"}) == "qwr-table1"
    assert report.method_of({"exp_name": "iq_continuous", "alpha": "0.9", "policy": "gaussian"}) == "M-IQ-gaussian"
    assert report.method_of({"exp_name": "iq_continuous", "alpha": "0.0", "residual": "True"}) == "PCL"
    assert report.method_of({"exp_name": "emaq_offline", "n_samples": "50"}) == "EMaQ N=50"
    assert report.grid_of({"exp_name": "qwr_atari", "total_timesteps": "100000"}) == "qwr-table2"


def test_the_emaq_d4rl_grid_runs_table_1_at_table_3s_sizes_and_the_report_finds_its_paper_numbers():
    runs = run.runs_of("emaq-d4rl", [1], None, None)
    assert len(runs) == 7 * 3 + 13  # Fig. 1's N on three MuJoCo datasets; Table 1's 13 rows
    kitchen = next(r for r in runs if r["env"] == "D4RL/kitchen/complete-v2")
    assert kitchen["args"][:6] == ["--dataset-id", "D4RL/kitchen/complete-v2", "--seed", "1", "--n-samples", "64"]
    flags = dict(zip(kitchen["args"][6::2], kitchen["args"][7::2]))
    assert flags == {"--batch-size": "128", "--num-q": "16", "--q-hidden": "256", "--q-layers": "4", "--mu-embed": "256",
                     "--mu-embed-layers": "4", "--mu-hidden": "128", "--mu-layers": "1", "--n-bins": "80"}
    # What the run logs names it as the grid does, so the report puts the paper's numbers beside it.
    hp = {"exp_name": "emaq_offline", "dataset_id": kitchen["env"], "n_samples": "64", "num_updates": "1000000",
          **{k[2:].replace("-", "_"): v for k, v in flags.items()}}
    assert (report.grid_of(hp), report.method_of(hp)) == ("emaq-d4rl", kitchen["method"])
    assert report.paper_cell(report.paper_numbers(), "emaq-d4rl", kitchen["method"], kitchen["env"]) == \
        "36.9 ± 3.7 (BC 27.2 ± 3.2, BCQ 26.5 ± 4.8, BEAR –)"
    pen = next(r for r in runs if r["env"] == "D4RL/pen/cloned-v2")
    assert report.paper_cell(report.paper_numbers(), "emaq-d4rl", pen["method"], pen["env"]).startswith("27.9 ± 3.7")


def test_the_emaq_n_grid_names_its_runs_as_the_report_does():
    import emaq_offline
    import qwr_offline

    for r in run.runs_of("emaq-n", [1], None, None):
        # What the run logs: its script's defaults, and the grid's flags (each "--flag value", or "--no-flag").
        module = {"emaq_offline.py": emaq_offline, "qwr_offline.py": qwr_offline}[r["script"]]
        hp = {k: str(v) for k, v in asdict(module.Args()).items()}
        args = r["args"]
        for i, a in enumerate(args):
            if a.startswith("--no-"):
                hp[a[5:].replace("-", "_")] = "False"
            elif a.startswith("--"):
                hp[a[2:].replace("-", "_")] = args[i + 1]
        assert report.method_of(hp) == r["method"]


def test_report_reads_final_returns_and_keeps_the_furthest_run_per_seed(tmp_path):
    hp = QWR | dict(env_id="Hopper-v4", total_timesteps=100_000)
    fake_run(tmp_path, "a", hp | dict(seed=1), [(50_000, 300.0), (100_000, 1200.0)])
    fake_run(tmp_path, "b", hp | dict(seed=1), [(10_000, 50.0)])  # an abandoned restart of seed 1
    fake_run(tmp_path, "c", hp | dict(seed=2), [(50_000, 700.0)])  # still running
    runs = sorted(report.collect_runs(tmp_path), key=lambda r: r["seed"])
    assert [(r["seed"], r["finished"], r["curve"][-1][1]) for r in runs] == [(1, True, 1200.0), (2, False, 700.0)]
    assert runs[0]["grid"] == "qwr-table1" and runs[0]["method"] == "QWR-LSE" and runs[0]["sps"] == 50


def test_median_and_half_interquartile_range():
    assert report.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == "3 ± 1"  # quartiles 2 and 4
    assert report.median_iqr([7.0]) == "7"


def test_paper_numbers_are_the_tables():
    paper = report.paper_numbers()
    assert paper[("qwr-table1", "QWR-LSE", "Walker2d-v4")]["score"] == "1301"
    assert paper[("qwr-table1", "AWR", "Hopper-v4")]["score"] == "110"
    assert paper[("qwr-table2", "QWR-LSE", "PongNoFrameskip-v4")]["score"] == "-7.6"
    assert paper[("qwr-table3", "QWR-LSE", "Humanoid-v4")]["score"] == "5675"
    with pytest.raises(KeyError):
        paper[("qwr-table1", "QWR-LSE", "Ant-v4")]


@pytest.mark.parametrize("hp", [
    dict(exp_name="qwr_offline", backup="lse", seed=1, dataset_id="local/hopper/x-v0", iterations=30, critic_steps=1000),
    # (logged by qwr_continuous.py's offline mode, before qwr_offline.py)
    dict(exp_name="qwr_continuous", backup="lse", env_id="Hopper-v4", total_timesteps=100_000, seed=1,
         offline_dataset_id="local/hopper/x-v0", offline_iterations=30, critic_steps=1000)])
def test_offline_runs_are_named_by_their_dataset_counted_in_updates_and_compared_with_it(hp, tmp_path, monkeypatch):
    fake_run(tmp_path / "runs", "a", hp, [(10, 400.0), (30, 500.0)], dataset_return=443.8, normalized_score=16.0)
    emaq = dict(exp_name="emaq_offline", dataset_id="local/hopper/x-v0", n_samples=10, q_hidden=256, mu_embed=256,
                num_updates=1000, seed=1)
    fake_run(tmp_path / "runs", "b", emaq, [(500, 450.0)], dataset_return=443.8)  # half way
    [qwr] = [r for r in report.collect_runs(tmp_path / "runs") if r["method"] == "QWR-LSE offline"]
    assert (qwr["grid"], qwr["env"], qwr["finished"]) == ("emaq", "local/hopper/x-v0", True)
    assert qwr["curve"] == [(10_000, 400.0), (30_000, 500.0)]  # iterations of 1000 critic updates
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.report("")
    assert "| QWR-LSE offline | local/hopper/x-v0 | 500 (score 16.0) | – | 500 | – | 1 | 444 |" in text
    assert "| EMaQ N=10 (Q 256, mu 256 units, 1000 updates) | local/hopper/x-v0 | – | – | – | – | 0 (+1 running) | – |" in text


def test_table1_rows_give_each_seed_the_sampled_policy_and_the_reference_policies(tmp_path, monkeypatch):
    hp = QWR | dict(env_id="Pendulum-v1", total_timesteps=100_000)
    for seed, final in ((1, 300.0), (2, 100.0), (3, 200.0)):
        fake_run(tmp_path / "runs", f"r{seed}", hp | dict(seed=seed), [(50_000, 0.0), (100_000, final)],
                 eval_return_sampled=final / 2, episodic_return=final / 4)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.report("")
    assert "| QWR-LSE | Pendulum-v1 | 200 ± 50 | 100 ± 25 | 300, 100, 200 | 50 ± 12 | 3 | – |" in text
    # Pendulum's zero action, played by hand: the pendulum starts at rest and swings freely.
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    total = 0.0
    for episode in range(10):
        env.reset(seed=episode)
        for _ in range(200):
            total += env.step([0.0])[1]
    assert f"| zero action (10 episodes) | Pendulum-v1 | {total / 10:.0f} |" in text
    assert "| uniform random (10 episodes) | Pendulum-v1 |" in text
    monkeypatch.setattr(gym, "make", None)  # the second report reads the cached returns
    assert report.report("") == text


def test_the_sampled_column_takes_the_seeds_that_logged_it_and_says_how_many(tmp_path, monkeypatch):
    hp = QWR | dict(env_id="Pendulum-v1", total_timesteps=100_000)
    fake_run(tmp_path / "runs", "r1", hp | dict(seed=1), [(100_000, 300.0)], eval_return_sampled=150.0)
    fake_run(tmp_path / "runs", "r2", hp | dict(seed=2), [(100_000, 100.0)])  # from before the sampled evaluation
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "reference_returns", lambda env: {"zero action": 0.0, "uniform random": 0.0})
    assert "| QWR-LSE | Pendulum-v1 | 200 ± 50 | 150 (1 of 2 seeds) | 300, 100 |" in report.report("")


def fake_script(tmp_path: Path, monkeypatch, code: str) -> None:
    """tmp_path/fake.py runs code; run.py's scripts, results and work directories all live in tmp_path."""
    (tmp_path / "fake.py").write_text(code)
    for sub in ("runs", "logs", "done"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "WORK", tmp_path / "work")


def test_runs_started_together_get_their_own_log_directories(tmp_path, monkeypatch):
    # Like the scripts, the fake names its directory after the second it starts in.
    fake_script(tmp_path, monkeypatch, "import os, time\nos.makedirs(f'runs/fake__{int(time.time())}')\n")
    runs = [dict(key=f"k{i}", script="fake.py", args=[]) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        assert [rc for _, rc, _ in pool.map(lambda r: run.launch(r, 1), runs)] == [0, 0]
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["k0.json", "k1.json"]


def test_adopt_marks_a_hand_made_run_done_in_its_own_table_only(tmp_path, monkeypatch):
    hp = QWR | dict(env_id="Hopper-v4", total_timesteps=100_000, seed=2)
    fake_run(tmp_path / "mine", "Hopper-v4__qwr_continuous__2__1", hp, [(100_000, 240.0)])
    fake_run(tmp_path / "mine", "unfinished", hp | dict(seed=3), [(50_000, 240.0)])
    monkeypatch.setattr(run, "RESULTS", tmp_path / "results")
    run.adopt(tmp_path / "mine")
    # QWR-LSE on Hopper is in Table 3 too, but at 1M steps: a 100K run is not done there.
    assert [p.name for p in (tmp_path / "results" / "done").iterdir()] == ["qwr-table1__QWR-LSE__Hopper-v4__2.json"]
    assert [p.name for p in (tmp_path / "results" / "runs").iterdir()] == ["Hopper-v4__qwr_continuous__2__1"]


def test_speed_table_gives_the_speed_up_and_the_share_of_the_machine():
    import torch

    from benchmarks import speed

    # 1 GFLOP per critic + actor step; 10 ms eager and 5 ms compiled per pair; 1 s of collection, 1000 pairs.
    r = dict(script="x.py", task="T", flops=1e9, updates_per_step=2, step={"eager": 0.010, "compiled": 0.005},
             compile_seconds=7, iteration={"eager": 11.0, "compiled": 6.0})
    # A second script with a bf16 mode: 4 ms per pair, 5.0 s per iteration.
    b = r | dict(script="y.py", step=r["step"] | {"bf16": 0.004}, iteration=r["iteration"] | {"bf16": 5.0})
    text = speed.table([r, b], limit=400e9, device=torch.device("cpu"))
    # 1e9 FLOP / 0.010 s = 100 GFLOP/s = 25% of 400; compiled 50%. 2 updates per 5 ms = 400 per second.
    assert "| x.py | T | cpu | 11.0 | 6.0 | 1.83x | – | 400 | 0.50 | 25% / 50% | 7 s |" in text
    assert "| y.py | T | cpu | 11.0 | 6.0 | 1.83x | bf16: 5.0, 2.20x | 400 | 0.50 | 25% / 50% | 7 s |" in text
    assert speed.matmul_limit(torch.device("cpu"), n=64, repeats=1) > 0


def test_two_run_py_never_run_the_same_run(tmp_path, monkeypatch):
    # Like the scripts, the fake makes its log directory, then works for a while.
    fake_script(tmp_path, monkeypatch, "import os, time\nos.makedirs('runs/fake__1')\ntime.sleep(3)\n")
    same = dict(key="k", script="fake.py", args=[])
    with ThreadPoolExecutor(2) as pool:  # as two run.py processes would, each holding the run's lock in turn
        codes = sorted(pool.map(lambda r: run.launch(r, 1)[1], [same, same]), key=str)
    assert codes == [0, None]  # one ran it, the other skipped it
    assert run.launch(same, 1)[1] is None  # and once it is done, nobody runs it again


def test_redo_sets_a_finished_run_aside_and_its_grid_makes_it_again(tmp_path, monkeypatch):
    fake_script(tmp_path, monkeypatch, "import os\nos.makedirs('runs/fake__1')\nprint('logs in runs/fake__1')\n")
    (tmp_path / "runs" / "other__2").mkdir()  # another run's log stays
    k = dict(key="k", script="fake.py", args=[])
    assert run.launch(k, 1)[1] == 0 and (tmp_path / "work" / "k" / "runs" / "fake__1").is_dir()
    run.redo(["k"], "a bug fixed since")
    aside = tmp_path / "superseded" / "k"
    assert sorted(p.name for p in aside.iterdir()) == ["done.json", "reason.txt", "runs", "stdout.log"]
    assert [p.name for p in (aside / "runs").iterdir()] == ["fake__1"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["other__2"]
    assert not (tmp_path / "done" / "k.json").exists() and not (tmp_path / "work" / "k").exists()
    kept = list((tmp_path / "work" / "superseded").iterdir())  # its checkpoint stays, out of the grid's way
    assert len(kept) == 1 and kept[0].name.startswith("k__") and (kept[0] / "runs" / "fake__1").is_dir()
    assert run.launch(k, 1)[1] == 0 and (tmp_path / "done" / "k.json").is_file()  # made again, from scratch
    with pytest.raises(SystemExit, match="set aside once"):
        run.redo(["k"], "again")
    with pytest.raises(SystemExit, match="has not finished"):
        run.redo(["never-run"], "bug")
    # A run taken in with --adopt has no stdout log; its marker names the directory it came from.
    (tmp_path / "done" / "adopted.json").write_text(json.dumps({"adopted_from": "/elsewhere/runs/other__2"}))
    run.redo(["adopted"], "bug")
    assert [p.name for p in (tmp_path / "superseded" / "adopted" / "runs").iterdir()] == ["other__2"]


def test_the_n_effect_table_puts_each_n_beside_the_dataset_mu_alone_and_qwr(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    emaq = dict(exp_name="emaq_offline", dataset_id=run.DATASETS_N[0], num_q="4", q_hidden="64", mu_embed="64",
                num_updates="60000")
    for seed, n, final in [(1, 1, -750.0), (2, 1, -760.0), (1, 50, -200.0)]:
        fake_run(tmp_path / "runs", f"n{n}s{seed}", emaq | dict(n_samples=str(n), seed=str(seed)),
                 [(5000, -900.0), (60000, final)], dataset_return=-776.0, behavior_return=-758.0 + seed)
    qwr = dict(exp_name="qwr_continuous", backup="lse", offline_dataset_id=run.DATASETS_N[0], offline_iterations="30",
               critic_steps="1000", seed="1")
    fake_run(tmp_path / "runs", "qwr", qwr, [(30, -300.0)])
    lines = report.n_effect_section("", report.collect_runs(tmp_path / "runs"))
    row = next(line for line in lines if line.startswith(f"| {run.DATASETS_N[0]} "))
    # mu alone once per seed (2); N = 1 over its two seeds; N = 5 and 10 not run; nor N = 10 at batch 256.
    assert row == f"| {run.DATASETS_N[0]} | -776 | -756 ± 0 (2) | -755 ± 2 (2) | – | – | -200 (1) | -300 (1) | – |"
    assert "| EMaQ N=50 | QWR-LSE offline | EMaQ N=10, batch 256 |" in "\n".join(lines)
    # In the whole report these runs are that table's row, not rows of the offline grid's table too.
    assert report.report("", report.collect_runs(tmp_path / "runs")).count(f"| {run.DATASETS_N[0]} |") == 1
    assert (tmp_path / "emaq-n.png").is_file()


def test_diagnostics_show_each_evaluations_iteration_and_not_the_at_bound_fraction_of_the_bug_window(tmp_path):
    hp = QWR | dict(env_id="Hopper-v4", total_timesteps=20_000)
    for seed, wall_time in ((1, 1795400000.0), (2, report.AT_BOUND_UNMEASURED[0] + 60.0)):
        fake_run(tmp_path, f"r{seed}", hp | dict(seed=seed), [(10_000, 200.0), (20_000, 3000.0)])
        writer = SummaryWriter(str(tmp_path / f"r{seed}"))
        for step in range(5_000, 20_001, 5_000):  # every iteration, evaluated or not
            for tag, value in (("diagnostics/mean_at_bound_fraction", step / 1e5),
                               ("diagnostics/q_spread", step / 1e3), ("diagnostics/weight_spread", 0.5)):
                writer.add_scalar(tag, value, step, walltime=wall_time + step)
        writer.close()
    text = report.diagnostics_report(report.collect_runs(tmp_path))
    assert "| 10000 | 200 | – | 0.1 | 10 | 0.5 | – | – |" in text
    assert "| 20000 | 3000 | – | 0.2 | 20 | 0.5 |" in text
    seed2 = text.split("seed 2")[1]
    assert "| 10000 | 200 | – | – | 10 | 0.5 | – | – |" in seed2 and "| 15000" not in text


def test_a_run_killed_inside_an_iteration_resumes_from_its_checkpoint_and_logs_each_step_once(tmp_path, monkeypatch):
    import signal
    import subprocess
    import threading
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for sub in ("runs", "logs", "done"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "WORK", tmp_path / "work")
    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(run.subprocess, "Popen", lambda *a, **kw: started.append(real_popen(*a, **kw)) or started[-1])
    flags = ["--env-id", "Hopper-v4", "--total-timesteps", "400", "--steps-per-iteration", "100", "--critic-steps", "60",
             "--actor-steps", "60", "--batch-size", "32", "--buffer-size", "1000", "--eval-every", "2",
             "--eval-episodes", "1", "--no-cuda"]
    r = dict(key="tiny__QWR-LSE__Hopper-v4__1", script="qwr_continuous.py", args=flags)
    log = tmp_path / "work" / r["key"] / "stdout.log"
    first = threading.Thread(target=run.launch, args=(r, 1))
    first.start()
    while not (log.is_file() and "iter 2/" in log.read_text()):  # its checkpoint after iteration 2 is written
        assert first.is_alive(), log.read_text()
        time.sleep(0.05)
    started[0].send_signal(signal.SIGKILL)  # in iteration 3 (or, on a fast machine, later)
    first.join()
    [ckpt] = (tmp_path / "work" / r["key"]).glob("runs/*/qwr_continuous.pt")
    done_iterations = torch.load(ckpt, weights_only=False)["iteration"]
    assert done_iterations in (2, 3)  # the print follows the checkpoint; the run had not finished
    assert not (tmp_path / "done" / f"{r['key']}.json").exists()
    relaunched = time.time()
    key, rc, _ = run.launch(r, 1)  # the grid run again: it resumes from the checkpoint
    assert rc == 0 and "--checkpoint-path" in started[1].args
    [run_dir] = list((tmp_path / "runs").iterdir())  # one log directory, that of the first start
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("charts/SPS")] == [100, 200, 300, 400]
    assert [e.step for e in acc.Scalars("charts/eval_return")] == [200, 400]
    # What the killed run logged after its last checkpoint is gone: every later event is the resumed run's.
    late = [e for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag) if e.step > 100 * done_iterations]
    assert late and all(e.wall_time >= relaunched for e in late)
    assert json.loads((tmp_path / "done" / f"{r['key']}.json").read_text())["resumed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "logs", "runs", "work"]  # no lock, pid or log
