"""What the tests of runs stopped and resumed share (test_qwr_continuous.py, test_qwr_atari.py)."""

import torch


def assert_same_learning_state(expected: dict, got: dict) -> None:
    """Two loaded checkpoints hold the same networks, target and optimiser states, bit for bit."""
    for part in ("actor", "critic", "target"):
        for name, tensor in expected[part].items():
            assert torch.equal(got[part][name], tensor), (part, name)
    for opt in ("actor_opt", "critic_opt"):
        for i, state in expected[opt]["state"].items():
            assert all(torch.equal(got[opt]["state"][i][k], v) for k, v in state.items()), (opt, i)


def run_whole(train, args, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """train(args) in tmp_path/whole, the run not stopped; returns its metrics and loaded last checkpoint,
    and leaves the current directory at tmp_path/stopped, for the run that will be."""
    for name in ("whole", "stopped"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = train(args)
    checkpoint = torch.load(whole["checkpoint"], weights_only=False)
    monkeypatch.chdir(tmp_path / "stopped")
    return whole, checkpoint
