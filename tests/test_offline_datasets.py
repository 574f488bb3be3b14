"""emaq_offline.py takes a Minari dataset by id: from the local store, downloaded by Minari when
missing (here with Minari's loader replaced, as this machine has no network), evaluated in the
environment the dataset describes, with Dict observations flattened the way the evaluation env
flattens them (qwr_offline.py: test_qwr_datasets.py)."""

import gymnasium as gym
import minari
import numpy as np
import pytest

import emaq_offline as emaq

STANDARD = "mujoco/hopper/medium-v0"  # a standard id that is not in the local store


def load(dataset_id: str, download: bool):
    """The script's own loading path, as its training starts it."""
    return emaq.load_dataset(emaq.Args(dataset_id=dataset_id, download=download), "cpu")


def test_a_missing_dataset_is_downloaded_by_minari_unless_no_download(tiny_dataset, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])
    real_loader, calls = minari.load_dataset, []

    def downloading_loader(dataset_id, download=False):  # stands in for a download: hands back the tiny dataset
        calls.append((dataset_id, download))
        if not download:
            return real_loader(dataset_id)
        return real_loader(tiny_dataset[1])

    monkeypatch.setattr(minari, "load_dataset", downloading_loader)
    load(STANDARD, True)
    assert calls == [(STANDARD, False), (STANDARD, True)]  # the local store first, then Minari's download
    with pytest.raises(SystemExit) as error:
        load(STANDARD, False)
    assert calls[-1] == (STANDARD, False)
    assert "--no-download" in str(error.value) and f"minari download {STANDARD}" in str(error.value)


class ConnectError(Exception):
    """Like httpx's ConnectError (what Minari's client raises without a network): not an OSError."""


def test_no_network_is_one_line_naming_the_id_the_download_command_and_a_local_dataset(tiny_dataset, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_dataset[0])

    def offline_loader(dataset_id, download=False):
        if not download:
            raise FileNotFoundError(dataset_id)  # (as Minari's loader says a dataset is not in the local store)
        raise ConnectError("[Errno -2] Name or service not known\n(and a traceback's worth of detail)")

    monkeypatch.setattr(minari, "load_dataset", offline_loader)
    with pytest.raises(SystemExit) as error:
        load(STANDARD, True)
    message = str(error.value)
    assert "\n" not in message and f"error: cannot download Minari dataset '{STANDARD}' (ConnectError" in message
    assert f"minari download {STANDARD}" in message and "benchmarks/datasets.py" in message
    assert f"local datasets: {tiny_dataset[1]}" in message


def test_evaluation_uses_the_datasets_evaluation_env_and_names_a_missing_package():
    class Dataset:
        def __init__(self, error=None):
            self.error, self.asked = error, []

        def recover_environment(self, eval_env=False):
            self.asked.append(eval_env)
            if self.error:
                raise self.error
            return gym.make("InvertedPendulum-v4" if eval_env else "Hopper-v4")

    dataset = Dataset()
    assert emaq.eval_env_spec(dataset, "D4RL/x/y-v0")[0].id == "InvertedPendulum-v4" and dataset.asked == [True]
    missing = ModuleNotFoundError("No module named 'gymnasium_robotics'", name="gymnasium_robotics")
    with pytest.raises(SystemExit, match=r"^error: D4RL/kitchen/complete-v2 evaluates in an environment of "
                                         r"gymnasium-robotics: pip install gymnasium-robotics$"):
        emaq.eval_env_spec(Dataset(missing), "D4RL/kitchen/complete-v2")


def test_dict_observations_flatten_in_the_order_the_evaluation_env_flattens_them():
    box = lambda n: gym.spaces.Box(-np.inf, np.inf, (n,), np.float32)  # noqa: E731
    # Kitchen/antmaze-like: nested, and the space's order is not the alphabetical one.
    space = gym.spaces.Dict([("observation", box(3)), ("desired_goal", gym.spaces.Dict([("kettle", box(2)),
                                                                                        ("burner", box(1))]))])
    space.seed(0)
    samples = [space.sample() for _ in range(4)]
    # A dataset's episode holds a batch per key; its dicts' keys may come in any order.
    batch = {"desired_goal": {"burner": np.stack([s["desired_goal"]["burner"] for s in samples]),
                              "kettle": np.stack([s["desired_goal"]["kettle"] for s in samples])},
             "observation": np.stack([s["observation"] for s in samples])}
    expected = np.stack([gym.spaces.flatten(space, s) for s in samples])  # what FlattenObservation returns
    np.testing.assert_array_equal(emaq.flat_obs(space, batch), expected)


def test_a_broken_local_dataset_is_not_reported_as_a_network_error(monkeypatch):
    def broken_loader(dataset_id, download=False):
        raise KeyError("dataset_id")  # e.g. metadata without the key Minari reads

    monkeypatch.setattr(minari, "load_dataset", broken_loader)
    with pytest.raises(KeyError):
        load(STANDARD, True)
