"""benchmarks/run.py's grids and benchmarks/report.py's reading of logs."""

from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks import report, run


def fake_run(root: Path, name: str, hp: dict, evals: list[tuple[int, float]]) -> None:
    writer = SummaryWriter(str(root / name))
    table = "\n".join(f"|{k}|{v}|" for k, v in hp.items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    for step, value in evals:
        writer.add_scalar("charts/eval_return", value, step)
        writer.add_scalar("charts/SPS", 50, step)
    writer.close()


def test_grids_name_every_table_and_filter_by_env_method_and_seed():
    runs = run.runs_of("qwr-table1", [1, 2], ["Hopper-v4"], ["AWR", "QWR-LSE"])
    assert [r["key"] for r in runs] == [
        "qwr-table1__QWR-LSE__Hopper-v4__1", "qwr-table1__QWR-LSE__Hopper-v4__2",
        "qwr-table1__AWR__Hopper-v4__1", "qwr-table1__AWR__Hopper-v4__2"]
    assert runs[0]["script"] == "qwr_continuous.py" and runs[0]["args"][-2:] == ["--backup", "lse"]
    assert len(run.runs_of("qwr-table1", [1, 2, 3, 4, 5], None, None)) == 4 * 4 * 5  # methods x envs x seeds
    assert run.runs_of("qwr-table3", [1], ["Walker2d-v4"], ["QWR-LSE"])[0]["args"][4:] == run.QWR_1M


def test_report_names_runs_from_their_hyper_parameters():
    assert report.method_of({"exp_name": "qwr_continuous", "backup": "mean"}) == "QWR-AVG"
    assert report.method_of({"exp_name": "awr_continuous"}) == "AWR"
    assert report.grid_of({"exp_name": "qwr_continuous", "total_timesteps": "1000000"}) == "qwr-table3"
    assert report.grid_of({"exp_name": "awr_continuous", "total_timesteps": "100000"}) == "qwr-table1"
    assert report.method_of({"exp_name": "iq_continuous", "alpha": "0.9", "policy": "gaussian"}) == "M-IQ-gaussian"
    assert report.method_of({"exp_name": "iq_continuous", "alpha": "0.0", "residual": "True"}) == "PCL"
    assert report.method_of({"exp_name": "emaq_offline", "n_samples": "50"}) == "EMaQ N=50"
    assert report.grid_of({"exp_name": "qwr_atari", "total_timesteps": "100000"}) == "qwr-table2"


def test_report_reads_final_returns_and_keeps_the_furthest_run_per_seed(tmp_path):
    hp = dict(exp_name="qwr_continuous", backup="lse", env_id="Hopper-v4", total_timesteps=100_000)
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
