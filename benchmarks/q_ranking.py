"""Does a trained QWR critic rank actions? Q against Monte-Carlo returns, from a checkpoint.

    python benchmarks/q_ranking.py <run>/qwr_continuous.pt --env-id Hopper-v4

QWR's actor follows the critic's ranking of the k actions it samples at a state (Eq. 3): with
advantages normalised over the batch, it does so at full strength however small Q's differences
are. This measures whether that ranking means anything. It plays the checkpoint's Gaussian policy
(std 0.4) from resets, keeps `--states` states met along the way, and at each one samples k actions
from the policy; for each action it restores the simulator to that state, takes the action, then
follows the policy until the episode ends or `--horizon` steps, `--repeats` times, and keeps the
mean discounted return (gamma of the checkpoint). Reported, averaged over states:
  - the Spearman correlation, within a state, between Q(s, a_j) and the Monte-Carlo return;
  - how far apart the k actions' Monte-Carlo returns are (their std over j), against the noise
    of one action's estimate (the std over repeats / sqrt(repeats)), and the same spread of Q.
MuJoCo only (the state is restored with set_state(qpos, qvel)).
"""

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwr_continuous as qwr  # noqa: E402


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--env-id", required=True)
    parser.add_argument("--states", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4, help="Monte-Carlo rollouts per (state, action)")
    parser.add_argument("--horizon", type=int, default=300, help="steps per rollout (gamma^300 = 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    args = qwr.Args(**{k: v for k, v in ckpt["args"].items() if k in qwr.Args.__dataclass_fields__})
    env = gym.make(a.env_id, **args.env_kwargs)
    obs_dim, space = env.observation_space.shape[0], env.action_space
    actor, obs_norm = qwr.Actor(obs_dim, space.shape[0]), qwr.ObsNormalizer(obs_dim, 0, args.obs_clip)
    critic = qwr.QNetwork(obs_dim, torch.as_tensor(space.low), torch.as_tensor(space.high), args)
    for net, k in ((actor, "actor"), (critic, "critic"), (obs_norm, "obs_norm")):
        net.load_state_dict(ckpt[k])
    rng = np.random.default_rng(a.seed)
    torch.manual_seed(a.seed)
    low, high = env.action_space.low, env.action_space.high

    def policy(obs: np.ndarray) -> np.ndarray:
        mean = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32))).numpy()
        return mean + args.action_std * rng.standard_normal(mean.shape)

    # States met by the policy: from resets, a random number of steps in.
    states = []
    while len(states) < a.states:
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        for _ in range(int(rng.integers(0, 200))):
            obs, _, terminated, truncated, _ = env.step(np.clip(policy(obs), low, high))
            if terminated or truncated:
                break
        else:
            data = env.unwrapped.data
            states.append((obs.copy(), data.qpos.copy(), data.qvel.copy()))
    rhos, mc_spread, mc_noise, q_spread, q_mean = [], [], [], [], []
    for obs, qpos, qvel in states:
        actions = policy(np.repeat(obs[None], args.n_samples, 0))  # k samples of mu(.|s)
        q = critic(obs_norm(torch.as_tensor(obs, dtype=torch.float32)),
                           torch.as_tensor(actions, dtype=torch.float32)).numpy()
        returns = np.zeros((args.n_samples, a.repeats))
        for j, action in enumerate(actions):
            for r in range(a.repeats):
                env.reset()
                env.unwrapped.set_state(qpos, qvel)
                step_obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
                total, discount = reward, args.gamma
                for _ in range(a.horizon - 1):
                    if terminated:
                        break
                    step_obs, reward, terminated, _, _ = env.step(np.clip(policy(step_obs), low, high))
                    total, discount = total + discount * reward, discount * args.gamma
                returns[j, r] = total
        mc = returns.mean(1)
        rhos.append(spearman(q, mc))
        mc_spread.append(mc.std())
        mc_noise.append(returns.std(1).mean() / np.sqrt(a.repeats))
        q_spread.append(q.std())
        q_mean.append(q.mean())
    rho = np.array(rhos)
    print(f"{a.checkpoint} (iteration {ckpt['iteration']}), {a.env_id}, {len(states)} states, k = {args.n_samples}, "
          f"{a.repeats} rollouts of up to {a.horizon} steps per action:")
    print(f"  Spearman(Q, Monte-Carlo return) within a state: mean {np.nanmean(rho):.2f}, median "
          f"{np.nanmedian(rho):.2f}, positive in {np.mean(rho[~np.isnan(rho)] > 0):.0%} of states")
    print(f"  spread over the k actions (std): Monte-Carlo return {np.mean(mc_spread):.2f} (noise of one "
          f"action's estimate {np.mean(mc_noise):.2f}), Q {np.mean(q_spread):.2f}; mean Q {np.mean(q_mean):.1f}")


if __name__ == "__main__":
    main()
