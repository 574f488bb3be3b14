"""Q-Value Weighted Regression (QWR) offline, from a Minari dataset (Section 4.4).

QWR (Kozakowski et al., ../shared/papers/qwr.md) learns offline with the two updates of
Algorithm 2 on a fixed dataset, without any environment step. A dataset stores no sampling
policy, so at every state mu is taken to be N(action taken, 0.4) (Section 4.4). Each iteration
  1. trains the critic Q(s, a) on multi-step TD(lambda) targets (Appendix 6.4, Eqs. 12-13)
     whose bootstrap F aggregates Q over k actions sampled from mu at the next state: mean,
     max or log-sum-exp (Section 2.3, Eq. 6);
  2. trains the actor by advantage-weighted regression over k actions sampled from mu (Eq. 3).
The networks, backups and defaults are those of qwr_continuous.py (Table 4), less its two
online settings (who clips the sampled action, the observation clip). Datasets come from
Minari (https://minari.farama.org), or from benchmarks/datasets.py, which writes them from
QWR's own runs.

    python qwr_offline.py --dataset-id local/hopper/qwr-replay-v0
"""

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # name of this experiment (part of the run directory)
    seed: int = 1  # seed of python, numpy, torch and the evaluation environments
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = True  # use CUDA when it is available
    compile: bool = False  # torch.compile the two gradient steps (faster; on a CPU it needs a C++ compiler)
    dataset_id: str = "local/hopper/qwr-replay-v0"  # Minari dataset ($MINARI_DATASETS_PATH, ~/.minari/datasets)
    download: bool = True  # download the dataset with Minari when it is not in the local store
    iterations: int = 30  # iterations of critic and actor steps (Section 4.4)
    critic_steps: int = 1000  # critic gradient steps per iteration (Table 4)
    actor_steps: int = 1000  # actor gradient steps per iteration (Table 4)
    target_update_every: int = 100  # critic steps between copies of the critic into the target
    batch_size: int = 256  # states per gradient step
    critic_lr: float = 5e-4  # Adam learning rate of the critic
    actor_lr: float = 1e-4  # Adam learning rate of the actor
    backup: Literal["lse", "max", "mean"] = "lse"  # backup F over the k sampled actions: QWR-LSE, -MAX or -AVG
    tau: float = 0.3  # log-sum-exp temperature (Appendix 6.1)
    backup_scale: Literal["mad", "std", "none"] = "mad"  # s(X) of Eq. 6: mean absolute deviation, std, or 1
    n_samples: int = 4  # k, actions sampled from mu per state, for backup and actor
    target_horizon: int = 3  # T, the longest of the multi-step targets
    td_lambda: float = 0.95  # lambda of the truncated TD(lambda) mix of the 1..T-step targets (Eq. 13)
    gamma: float = 0.99  # discount factor
    beta: float = 1.0  # temperature of the advantage weights exp(A / beta)
    max_weight: float = 20.0  # advantage weights are clipped at this value
    action_std: float = 0.4  # std of the policy and of mu = N(action taken, std) (Section 4.4)
    eval_every: int = 10  # evaluate, deterministic and sampled, every this many iterations (and at the end)
    eval_episodes: int = 10  # episodes per evaluation, in the environment the dataset names
    save_model: bool = False  # write the actor, critic and normaliser at the end


# The math of QWR, as in qwr_continuous.py (tests/ check both)


def sample_actions(mu_mean: torch.Tensor, mu_std: torch.Tensor, k: int) -> torch.Tensor:
    """k actions from each Gaussian mu = N(mean, std): [..., act_dim] -> [..., k, act_dim]."""
    noise = torch.randn(mu_mean.shape[:-1] + (k,) + mu_mean.shape[-1:], device=mu_mean.device)
    return mu_mean.unsqueeze(-2) + mu_std.unsqueeze(-2) * noise


def backup_values(q: torch.Tensor, kind: str, tau: float, scale: str) -> torch.Tensor:
    """Backup F (Section 2.3, Eq. 6) over the k sampled Q-values in q[..., k]: the mean, the max, or
    F(X) = s tau (logsumexp(X / (s tau)) - log k) with ONE scale s over the whole batch (mean absolute
    deviation, std or 1), as the authors' code does. s = 0 gives the mean, never NaN."""
    if kind == "mean":
        return q.mean(-1)
    if kind == "max":
        return q.amax(-1)
    s = {"mad": lambda: (q - q.mean()).abs().mean(), "std": lambda: q.std(correction=0),
         "none": lambda: torch.ones((), dtype=q.dtype, device=q.device)}[scale]()
    temp = s * tau
    safe_temp = torch.where(temp > 0, temp, torch.ones_like(temp))
    top = q.amax(-1, keepdim=True)  # temp * log mean exp(q / temp) without overflow or cancellation
    lse = top.squeeze(-1) + safe_temp * torch.log1p(torch.expm1((q - top) / safe_temp).mean(-1))
    return torch.where(temp > 0, lse, q.mean(-1))


def td_lambda_targets(rewards, bootstrap, terminated, last, gamma: float, lam: float) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices [..., T] (Appendix 6.4, Eq. 13):
    weights (1 - lam) lam^(n-1) on the n-step targets, the remainder on the T-step one; a termination
    stops bootstrapping, a truncation bootstraps from the final observation, and a slice stops at an
    episode end (last)."""
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def advantage_weights(q: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Eq. 3's weights for q[B, k]: A = Q(s, a_j) - mean_j Q, normalised over the batch, then
    min(exp(A / beta), max_weight)."""
    adv = q - q.mean(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


# The dataset as a replay buffer, the networks


# D4RL's random and expert returns, for normalised scores (0 random, 100 expert) when a dataset has none.
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3),
                   "Walker2d": (1.629008, 4592.3)}


def load_dataset(args: Args, device) -> tuple[dict, gym.envs.registration.EnvSpec, tuple]:
    """The dataset's steps as tensors [N, ...] with mu = N(a_taken, action_std) at every state and at
    the next one (at an episode's end, centred on its last action); the EnvSpec to evaluate in; the
    (random, expert) returns for normalised scores."""
    try:
        dataset = minari.load_dataset(args.dataset_id, download=args.download)
    except Exception as e:  # not in the local store, no network, an unknown id
        where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise SystemExit(f"error: no Minari dataset {args.dataset_id!r} in {where} ({type(e).__name__}: "
                         f"{str(e).strip()[:150]}); get it with `minari download {args.dataset_id}`, or make one "
                         f"with benchmarks/datasets.py (docs/qwr_offline.md)")
    parts = {k: [] for k in ("obs", "next_obs", "action", "next_mu_mean", "reward", "terminated", "episode_end")}
    for ep in dataset.iterate_episodes():
        n, obs = len(ep.rewards), np.asarray(ep.observations, np.float32)
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])
        parts["action"].append(ep.actions)
        parts["next_mu_mean"].append(np.concatenate([ep.actions[1:], ep.actions[-1:]]))
        parts["reward"].append(ep.rewards)
        parts["terminated"].append(np.asarray(ep.terminations, bool))  # (stored as integers by some writers)
        parts["episode_end"].append(np.arange(n) == n - 1)
    data = {k: torch.as_tensor(np.concatenate(v)).to(device) for k, v in parts.items()}
    for k in ("obs", "next_obs", "action", "next_mu_mean", "reward"):
        data[k] = data[k].float()
    data["mu_mean"], data["mu_std"] = data["action"], torch.full_like(data["action"], args.action_std)
    env = dataset.recover_environment(eval_env=True)  # the dataset's evaluation env, else the one it was made in
    spec = env.spec
    env.close()
    meta = dataset.storage.metadata
    refs = ((meta["ref_min_score"], meta["ref_max_score"]) if meta.get("ref_max_score") is not None
            else D4RL_REF_SCORES.get(spec.id.split("/")[-1].split("-")[0]))
    return data, spec, refs


def sample(data: dict, batch_size: int, horizon: int) -> dict:
    """Slices of `horizon` consecutive steps [B, T, ...] from random starts; "last" marks where a slice
    must stop: an episode's end (the dataset's last step is one, so no slice wraps into its first)."""
    n = len(data["reward"])
    rows = torch.randint(0, n, (batch_size,), device=data["reward"].device)[:, None]
    out = {k: v[(rows + torch.arange(horizon, device=rows.device)) % n] for k, v in data.items()}
    out["last"] = out["episode_end"]
    return out


def mlp(in_dim: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class QNetwork(nn.Module):
    """Q(s, a): the observation o, gated by a linear embedding of each action, o * tanh(W a + b), then
    LayerNorm, 256 ReLU units and a linear output scaled by 1 / (1 - gamma) (the authors' Trax Value
    model; see qwr_continuous.py)."""

    def __init__(self, obs_dim: int, act_dim: int, gamma: float):
        super().__init__()
        self.torso, self.embed = mlp(obs_dim), nn.Linear(act_dim, 256)
        self.torso.append(nn.Linear(256, 256))
        self.head = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        self.out_scale = 1 / (1 - gamma)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [..., obs_dim] (normalised), actions [..., k, act_dim] -> Q [..., k]."""
        return self.head(self.torso(obs).unsqueeze(-2) * torch.tanh(self.embed(actions))).squeeze(-1) * self.out_scale


class Actor(nn.Module):
    """Mean of the Gaussian policy (std fixed); a near-zero head as in the authors' code."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim), nn.Linear(256, act_dim))
        nn.init.uniform_(self.net[-1].weight, -0.01, 0.01)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class ObsNormalizer(nn.Module):
    """(x - mean) / (std + 1e-5) with the statistics of the whole dataset."""

    def __init__(self, obs: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", obs.mean(0))
        self.register_buffer("std", obs.std(0, correction=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + 1e-5)


@torch.no_grad()
def evaluate(args: Args, spec, actor, obs_norm, device, action_std: float = 0.0) -> np.ndarray:
    """Returns of eval_episodes episodes in the dataset's environment: the deterministic policy, or with
    action_std > 0 the sampled one. The environment executes the action clipped to its bounds."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.ClipAction(gym.make(spec))] * args.eval_episodes,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    obs, _ = envs.reset(seed=args.seed + 10_000)
    noise = torch.Generator(device).manual_seed(args.seed + 10_000)
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        action = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device)))
        action += action_std * torch.randn(action.shape, generator=noise, device=device)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# The two gradient steps (Algorithm 2 lines 11-14 and 17-21)


def critic_step(args: Args, b: dict, critic, target, critic_opt, obs_norm) -> torch.Tensor:
    """One critic step on T-step slices: targets from the target network at k actions a' ~ mu(.|s');
    returns (loss, mean Q, mean target)."""
    with torch.no_grad():
        next_actions = sample_actions(b["next_mu_mean"], b["mu_std"], args.n_samples)
        bootstrap = backup_values(target(obs_norm(b["next_obs"]), next_actions), args.backup, args.tau,
                                  args.backup_scale)
        y = td_lambda_targets(b["reward"], bootstrap, b["terminated"], b["last"], args.gamma, args.td_lambda)
    q = critic(obs_norm(b["obs"][:, 0]), b["action"][:, :1]).squeeze(-1)
    loss = ((q - y) / critic.out_scale).pow(2).mean()  # in the network's own units
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return torch.stack([loss.detach(), q.detach().mean(), y.mean()])


def actor_step(args: Args, b: dict, actor, critic, actor_opt, obs_norm) -> torch.Tensor:
    """One actor step: regression on k actions from mu at s, weighted by the critic's advantages;
    returns (loss, fraction of clipped weights)."""
    obs = obs_norm(b["obs"][:, 0])
    actions = sample_actions(b["mu_mean"][:, 0], b["mu_std"][:, 0], args.n_samples)
    with torch.no_grad():
        weights = advantage_weights(critic(obs, actions), args.beta, args.max_weight)
    z = (actions - actor(obs).unsqueeze(1)) / args.action_std
    log_prob = (-0.5 * z.pow(2) - math.log(args.action_std * math.sqrt(2 * math.pi))).sum(-1)
    loss = -(weights * log_prob).mean()
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    actor_opt.step()
    return torch.stack([loss.detach(), (weights >= args.max_weight).float().mean()])


def train(args: Args) -> dict:
    """Offline QWR (Section 4.4); returns the final metrics."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    data, spec, refs = load_dataset(args, device)
    if data["obs"].ndim != 2:
        raise SystemExit(f"error: qwr_offline.py needs flat vector observations; {args.dataset_id} has "
                         f"{tuple(data['obs'].shape[1:])}")
    obs_dim, act_dim = data["obs"].shape[-1], data["action"].shape[-1]
    actor, critic = Actor(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim, args.gamma).to(device)
    target = copy.deepcopy(critic).requires_grad_(False)
    obs_norm = ObsNormalizer(data["obs"]).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5)  # (the authors' Adam eps)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    run_name = f"{spec.id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    torch._inductor.config.fallback_random = True  # compiled code draws the random numbers eager code does
    critic_update = torch.compile(critic_step) if args.compile else critic_step
    actor_update = torch.compile(actor_step) if args.compile else actor_step
    # Every episode ends with episode_end: the mean episode return of the data, what QWR should beat.
    dataset_return = (data["reward"].sum() / data["episode_end"].sum()).item()
    writer.add_scalar("charts/dataset_return", dataset_return, 0)
    print(f"QWR-{args.backup} offline from {args.dataset_id} ({len(data['reward'])} steps, mean return "
          f"{dataset_return:.1f}; {device}), {args.iterations} iterations, logs in runs/{run_name}")
    metrics, start_time = {}, time.time()
    for iteration in range(args.iterations):  # the x-axis counts iterations: there are no env steps
        critic_sums = torch.zeros(3, device=device)
        for i in range(args.critic_steps):
            if i % args.target_update_every == 0:  # the target network is the critic of now
                target.load_state_dict(critic.state_dict())
            critic_sums += critic_update(args, sample(data, args.batch_size, args.target_horizon), critic, target,
                                         critic_opt, obs_norm)
        actor_sums = torch.zeros(2, device=device)
        for _ in range(args.actor_steps):
            actor_sums += actor_update(args, sample(data, args.batch_size, 1), actor, critic, actor_opt, obs_norm)
        metrics = dict(zip(("critic_loss", "q_mean", "target_mean", "actor_loss", "clipped_weight_fraction"),
                           torch.cat([critic_sums / max(1, args.critic_steps),
                                      actor_sums / max(1, args.actor_steps)]).tolist()))
        if not math.isfinite(metrics["critic_loss"] + metrics["actor_loss"]):
            raise FloatingPointError(f"non-finite losses at iteration {iteration + 1}: {metrics}")
        step = iteration + 1
        for k, v in metrics.items():
            writer.add_scalar(f"losses/{k}", v, step)
        line = f"iter {step}/{args.iterations}"
        if (step % args.eval_every == 0 or step == args.iterations) and args.eval_episodes > 0:
            metrics["eval_return"] = float(evaluate(args, spec, actor, obs_norm, device).mean())
            metrics["eval_return_sampled"] = float(evaluate(args, spec, actor, obs_norm, device, args.action_std).mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], step)
            writer.add_scalar("charts/eval_return_sampled", metrics["eval_return_sampled"], step)
            line += f" | eval return {metrics['eval_return']:.1f} (sampled {metrics['eval_return_sampled']:.1f})"
            if refs:  # D4RL's normalised score: 0 random, 100 expert
                metrics["normalized_score"] = 100 * (metrics["eval_return"] - refs[0]) / (refs[1] - refs[0])
                writer.add_scalar("charts/normalized_score", metrics["normalized_score"], step)
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | "
              f"{(time.time() - start_time) / step:.1f} s/iter", flush=True)
    if args.save_model:
        metrics["checkpoint"] = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save(dict(actor=actor.state_dict(), critic=critic.state_dict(), obs_norm=obs_norm.state_dict(),
                        args=asdict(args)), metrics["checkpoint"])
    writer.close()
    return metrics | dict(run_name=run_name, dataset_return=dataset_return, global_step=args.iterations)


if __name__ == "__main__":
    train(tyro.cli(Args))
