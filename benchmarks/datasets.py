"""Write Minari datasets from QWR's own runs, for qwr_offline.py and emaq_offline.py.

    # every step a qwr_continuous.py run collects (a "replay" dataset); the run's flags follow --
    python benchmarks/datasets.py replay local/hopper/qwr-replay-v0 -- --env-id Hopper-v4 --seed 1
    # episodes of a trained policy (a "medium" dataset, from a checkpoint of --save-model)
    python benchmarks/datasets.py policy local/hopper/qwr-medium-v0 --checkpoint runs/<run>/qwr_continuous.pt

Both store the actions the environment executed, the Gaussian samples clipped to the action
bounds, with each episode's true final observation; an episode still running when collection
stops ends there, truncated. Datasets go to $MINARI_DATASETS_PATH (default ~/.minari/datasets).
"""

import argparse
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwr_continuous as qwr  # noqa: E402

# D4RL's random and expert returns, for normalised scores (0 random, 100 expert).
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3),
                   "Walker2d": (1.629008, 4592.3)}


def episodes_of(rollouts: list, low: np.ndarray, high: np.ndarray) -> list:
    """Cut rollouts ([steps, num_envs] each, in order) into each env's episodes: observations (T + 1,
    the last the true final one), the executed (clipped) actions, rewards, terminations, truncations."""
    data = {k: torch.cat([r[k] for r in rollouts]).cpu().numpy()
            for k in ("obs", "action", "reward", "terminated", "episode_end", "next_obs")}
    n_steps, n_envs = data["reward"].shape
    episodes = []
    for e in range(n_envs):
        ends = np.flatnonzero(data["episode_end"][:, e] | (np.arange(n_steps) == n_steps - 1))
        for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends + 1):
            terminated = data["terminated"][start:end, e]
            episodes.append(dict(
                observations=np.concatenate([data["obs"][start:end, e], data["next_obs"][end - 1 : end, e]]),
                actions=np.clip(data["action"][start:end, e], low, high), rewards=data["reward"][start:end, e],
                terminations=terminated, truncations=~terminated & (np.arange(start, end) == end - 1)))
    return episodes


def write_dataset(dataset_id: str, episodes: list, env_id: str, description: str) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    ref = D4RL_REF_SCORES.get(env_id.split("/")[-1].split("-")[0], (None, None))
    with warnings.catch_warnings():  # minari asks for an author and e-mail, which a local dataset need not have
        warnings.filterwarnings("ignore", message=".*is set to None", category=UserWarning)
        minari.create_dataset_from_buffers(
            dataset_id=dataset_id, env=env_id, algorithm_name="QWR (qwr_continuous.py)", description=description,
            ref_min_score=ref[0], ref_max_score=ref[1],
            buffer=[EpisodeBuffer(observations=ep["observations"], actions=ep["actions"], rewards=list(ep["rewards"]),
                                  terminations=list(ep["terminations"]), truncations=list(ep["truncations"]))
                    for ep in episodes])
    print(f"wrote Minari dataset {dataset_id}: {len(episodes)} episodes, {sum(len(e['rewards']) for e in episodes)} steps")


def replay(dataset_id: str, args: qwr.Args) -> dict:
    """Train qwr_continuous.py with args, recording every rollout its collect() returns; write them all."""
    rollouts, collect = [], qwr.collect

    def recording_collect(*a, **kw):
        rollout, obs, episodes = collect(*a, **kw)
        rollouts.append({k: v.cpu() for k, v in rollout.items()})
        return rollout, obs, episodes

    qwr.collect = recording_collect
    try:
        metrics = qwr.train(args)
    finally:
        qwr.collect = collect
    space = qwr.check_env(args)
    write_dataset(dataset_id, episodes_of(rollouts, space.low, space.high), args.env_id,
                  f"every step of {args.total_timesteps} collected by qwr_continuous.py (seed {args.seed})")
    return metrics


def policy(dataset_id: str, checkpoint: str, n: int, seed: int) -> None:
    """One episode in each of n environments of the checkpoint's stochastic policy; write them."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    args = qwr.Args(**{k: v for k, v in ckpt["args"].items() if k in qwr.Args.__dataclass_fields__})
    space = qwr.check_env(args)
    envs = qwr.make_vec_env(args, n)
    obs_dim = envs.single_observation_space.shape[0]
    actor, obs_norm = qwr.Actor(obs_dim, space.shape[0]), qwr.ObsNormalizer(obs_dim, 0, args.obs_clip)
    actor.load_state_dict(ckpt["actor"])
    obs_norm.load_state_dict(ckpt["obs_norm"])
    obs, _ = envs.reset(seed=seed)
    horizon = gym.spec(args.env_id).max_episode_steps or 1000  # every env ends an episode by then
    torch.manual_seed(seed)
    rollout, _, _ = qwr.collect(envs, obs, horizon, actor, obs_norm, args.action_std, "cpu")
    envs.close()
    episodes = [episodes_of([{k: v[:, e : e + 1] for k, v in rollout.items()}], space.low, space.high)[0]
                for e in range(n)]
    write_dataset(dataset_id, episodes, args.env_id,
                  f"episodes of QWR's Gaussian policy (std {args.action_std}) from {checkpoint}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["replay", "policy"])
    parser.add_argument("dataset_id", help="Minari id to write, e.g. local/hopper/qwr-replay-v0")
    parser.add_argument("--checkpoint", help="policy: a qwr_continuous.py checkpoint (--save-model)")
    parser.add_argument("--episodes", type=int, default=50, help="policy: episodes (the paper's datasets: 50)")
    parser.add_argument("--seed", type=int, default=20_000, help="policy: seed of the episodes")
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    import minari

    if a.dataset_id in minari.list_local_datasets():
        sys.exit(f"error: dataset {a.dataset_id} exists already; choose another id or version")
    if a.kind == "replay":
        replay(a.dataset_id, tyro.cli(qwr.Args, args=rest))
    elif not a.checkpoint:
        parser.error("policy needs --checkpoint")
    else:
        policy(a.dataset_id, a.checkpoint, a.episodes, a.seed)


if __name__ == "__main__":
    main()
