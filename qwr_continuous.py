"""Q-Value Weighted Regression (QWR) for continuous control (MuJoCo), online.

QWR (Kozakowski et al., ../shared/papers/qwr.md, Algorithm 2) is AWR with a Q-value critic.
Each iteration it
  1. collects 1000 env steps with a Gaussian policy of fixed std 0.4 and stores, with every
     step, the sampling policy mu(.|s) that chose the action;
  2. trains the critic Q(s, a) on multi-step TD(lambda) targets (Appendix 6.4, Eqs. 12-13)
     whose bootstrap F aggregates Q over k actions sampled from the stored mu: mean, max or
     log-sum-exp (Section 2.3, Eq. 6);
  3. trains the actor by advantage-weighted regression over k actions sampled from the stored
     mu (Eq. 3): weights exp(A / beta), A = Q(s, a_j) - mean_j Q.
Defaults are the paper's Table 4 and the 100K setting of Appendix 6.1. Where the paper is
silent, the authors' Trax code (class SamplingAWR) decides, and a comment says so. Four
defaults differ from their system (docs/qwr_continuous.md); two of them were chosen by Table 1's
runs: the critic sees the clipped action, and the normalised observation is clipped
(docs/results.md). The offline variant (Section 4.4) is qwr_offline.py.

    python qwr_continuous.py --env-id Walker2d-v4
"""

import copy
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # name of this experiment (part of the run directory)
    seed: int = 1  # seed of python, numpy, torch and the environments
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = True  # use CUDA when it is available (the replay buffer and all updates live there)
    compile: bool = False  # torch.compile the two gradient steps (faster; on a CPU it needs a C++ compiler)
    env_id: str = "Walker2d-v4"  # gymnasium id of an environment with a bounded continuous (Box) action space
    env_kwargs: dict[str, bool | int | float] = field(default_factory=dict)  # more arguments of gym.make
    # Algorithm 2's schedule (Table 4)
    total_timesteps: int = 100_000  # environment steps in total (the paper's 100K budget, Table 1)
    steps_per_iteration: int = 1000  # environment steps collected per iteration
    num_envs: int = 1  # parallel environments that share the per-iteration step budget
    buffer_size: int = 50_000  # replay buffer capacity in environment steps
    critic_steps: int = 1000  # critic gradient steps per iteration (n_critic_steps)
    actor_steps: int = 1000  # actor gradient steps per iteration (n_actor_steps)
    target_update_every: int = 100  # critic steps between copies of the critic into the target (update_frequency)
    batch_size: int = 256  # states per gradient step, for actor and critic
    critic_lr: float = 5e-4  # Adam learning rate of the critic (alpha_V)
    actor_lr: float = 1e-4  # Adam learning rate of the actor (alpha_pi)
    max_grad_norm: float = 0.0  # clip each network's gradient norm at this (authors' MuJoCo config: 50); 0: off
    # Critic targets (Section 2.3, Appendix 6.1 and 6.4)
    backup: Literal["lse", "max", "mean"] = "lse"  # backup F over the k sampled actions: QWR-LSE, -MAX or -AVG
    tau: float = 0.3  # log-sum-exp temperature (0.3 at 100K steps, 1.0 at 1M; Appendix 6.1)
    backup_scale: Literal["mad", "std", "none"] = "mad"  # s(X) of Eq. 6: mean abs. deviation (100K), std (1M), 1
    n_samples: int = 4  # k, actions sampled from the stored mu per state, for backup and actor
    target_horizon: int = 3  # T, the longest of the multi-step targets (Table 4's "margin")
    td_lambda: float = 0.95  # lambda of the truncated TD(lambda) mix of the 1..T-step targets (Eq. 13)
    gamma: float = 0.99  # discount factor
    critic_head_init: float = 0.0  # Q's last layer starts at U(+-this) (authors' config: 0.01); 0: PyTorch's init
    # Who clips a sampled action: "both" (the env executes and charges it clipped, and the critic sees it clipped, so
    # Q is flat outside the bounds as the true Q is), "env" (the critic sees it sampled), "none" (the authors': both get
    # it sampled; MuJoCo clamps the control, charging the action given). Table 1 chose "both" (docs/results.md).
    clip_actions: Literal["env", "none", "both"] = "both"
    # Actor (Eq. 3) and observations
    beta: float = 1.0  # temperature of the advantage weights exp(A / beta)
    max_weight: float = 20.0  # advantage weights are clipped at this value
    action_std: float = 0.4  # fixed standard deviation of the Gaussian policy
    obs_norm_sample_limit: int = 300_000  # observations after which the normaliser freezes (authors' code)
    # Clip normalised observations to +-this, as CleanRL does; 0: no clip (authors' code). Table 1 chose 10:
    # Humanoid-v4's contact forces normalise to hundreds of stds without it (docs/results.md).
    obs_clip: float = 10.0
    # Evaluation, logging, checkpoints
    eval_every: int = 10  # evaluate, deterministic and sampled, every this many iterations (and at the end)
    eval_episodes: int = 10  # episodes per evaluation
    capture_video: bool = False  # record the first episode of each evaluation to videos/
    save_model: bool = False  # write a checkpoint (networks, optimisers, replay buffer) after every iteration
    checkpoint_path: Optional[str] = None  # checkpoint to resume from, in its run directory


# The math of QWR, as pure functions (tests/ check them against hand values)
def sample_actions(mu_mean: torch.Tensor, mu_std: torch.Tensor, k: int) -> torch.Tensor:
    """k actions from each stored Gaussian mu = N(mean, std): [..., act_dim] -> [..., k, act_dim]
    (Algorithm 2 lines 12 and 18). Unclipped: mu's density is defined for them."""
    noise = torch.randn(mu_mean.shape[:-1] + (k,) + mu_mean.shape[-1:], device=mu_mean.device)
    return mu_mean.unsqueeze(-2) + mu_std.unsqueeze(-2) * noise


def backup_values(q: torch.Tensor, kind: str, tau: float, scale: str) -> torch.Tensor:
    """Backup F (Section 2.3, Eq. 6) over the k sampled Q-values in q[..., k]. "mean" estimates E_mu Q
    (QWR-AVG), "max" the greedy value, "lse" is F(X) = s tau (logsumexp(X / (s tau)) - log k), between
    the two: tau -> 0 gives max, tau -> inf gives mean. As in the authors' code, s is ONE scalar over
    every Q-value in q (all states, steps and samples of the batch): the mean absolute deviation ("mad"),
    the standard deviation ("std") or 1 ("none"). s = 0 means all values are equal; then the result is
    their mean, never NaN (the authors add 1e-5 to s instead)."""
    if kind == "mean":
        return q.mean(-1)
    if kind == "max":
        return q.amax(-1)
    s = {"mad": lambda: (q - q.mean()).abs().mean(), "std": lambda: q.std(correction=0),
         "none": lambda: torch.ones((), dtype=q.dtype, device=q.device)}[scale]()
    temp = s * tau
    safe_temp = torch.where(temp > 0, temp, torch.ones_like(temp))  # no NaN value or gradient at s = 0
    # temp * log mean exp(q / temp) as top + temp * log1p(mean(expm1((q - top) / temp))), top = max q:
    # exp() cannot overflow, and at a high temperature (F near the mean) no precision is lost to
    # log(k) - log(k), which in float32 is off by ~1e-7 * temp.
    top = q.amax(-1, keepdim=True)
    lse = top.squeeze(-1) + safe_temp * torch.log1p(torch.expm1((q - top) / safe_temp).mean(-1))
    return torch.where(temp > 0, lse, q.mean(-1))


def td_lambda_targets(rewards, bootstrap, terminated, last, gamma: float, lam: float) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices (Appendix 6.4). Inputs are [..., T]
    along a stored trajectory: rewards r_t, bootstrap F_t = F(Q(s_{t+1}, .)), terminated_t, and last_t
    (the episode ends at t, or t is the newest step stored). With Q_n the n-step target of Eq. 12:
        (1 - lam) Q_1 + lam (1 - lam) Q_2 + ... + lam^(T-1) Q_T,
    weights summing to 1 (Eq. 13 with the remainder on the last term, as the authors' code does), by
        G_t = r_t + gamma * (1 - terminated_t) * ((1 - lam) F_t + lam G_{t+1}),
    with G_{t+1} replaced by F_t at t = T-1 and at an episode end: a target never crosses into the next
    episode; after a termination it stops, after a truncation it bootstraps from the final observation."""
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:  # a longer target follows, unless the slice stops at t
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def advantage_weights(q: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Actor weights of Eq. 3 / Algorithm 2 lines 19-20 for q[B, k] = Q(s, a_j): A = Q(s, a_j) - mean_j Q
    (V is the mean over the k samples whatever the critic's backup, as in the authors' code), normalised
    over the batch (mean and std, Appendix 6.1), then w = min(exp(A / beta), max_weight), without overflow."""
    adv = q - q.mean(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


# Environment, replay buffer, observation normaliser, networks
def make_env(args: Args, video_folder: Optional[str] = None) -> gym.Env:
    env = gym.make(args.env_id, render_mode="rgb_array" if video_folder else None, **args.env_kwargs)
    if video_folder:
        os.environ.setdefault("MUJOCO_GL", "egl" if sys.platform == "linux" else "glfw")  # render without a screen
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)
    # The policy's Gaussian samples can leave the action bounds. The authors' code passed them on to gym's
    # MuJoCo envs, which clamp the control but charge the control cost on the action given (--clip-actions none).
    return env if args.clip_actions == "none" else gym.wrappers.ClipAction(env)


def make_vec_env(args: Args, n: int, video_folder: Optional[str] = None) -> gym.vector.VectorEnv:
    # SAME_STEP autoreset: every step is a real transition; when an episode ends, the returned observation
    # already starts the next one and the true last observation is in info["final_obs"].
    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(args, video_folder if i == 0 else None) for i in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)  # info["episode"] at episode ends


class ReplayBuffer:
    """The last `capacity` steps of each env, time-major: data[name][row, env]. Besides (s, a, r,
    terminated) every step stores the sampling policy mu that chose a (its mean and std; Algorithm 2
    line 11), the next observation s' (the true final one at an episode end), and the mean of the same
    mu at s', from which the backup samples a' (line 12)."""

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        shapes = dict(obs=(obs_dim,), action=(act_dim,), mu_mean=(act_dim,), mu_std=(act_dim,), reward=(),
                      terminated=(), episode_end=(), next_obs=(obs_dim,), next_mu_mean=(act_dim,))
        self.data = {k: torch.zeros((capacity, num_envs) + s, device=device,
                                    dtype=torch.bool if k in ("terminated", "episode_end") else torch.float32)
                     for k, s in shapes.items()}
        self.ptr, self.size = 0, 0

    def add(self, rollout: dict) -> None:
        """Append a rollout of tensors shaped [steps, num_envs, ...]."""
        n = rollout["obs"].shape[0]
        rows = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for k, v in rollout.items():
            self.data[k][rows] = v.to(self.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def gather(self, row: torch.Tensor, env: torch.Tensor, horizon: int) -> dict:
        """Slices of `horizon` consecutive steps starting at (row, env), [B, T, ...]. "last" marks where a
        slice must stop: an episode end, or the newest stored step, whose successor is not stored yet."""
        rows = (row[:, None] + torch.arange(horizon, device=self.device)) % self.capacity
        out = {k: v[rows, env[:, None].expand_as(rows)] for k, v in self.data.items()}
        out["last"] = out["episode_end"] | (rows == (self.ptr - 1) % self.capacity)
        return out

    def sample(self, batch_size: int, horizon: int) -> dict:
        row = torch.randint(0, self.size, (batch_size,), device=self.device)
        env = torch.randint(0, self.num_envs, (batch_size,), device=self.device)
        return self.gather(row, env, horizon)


class ObsNormalizer(nn.Module):
    """Running mean and variance of observations, (x - mean) / (std + 1e-5), as the authors' networks
    begin (Trax Normalize), updated with the observations the agent acts on until `sample_limit` of
    them. The authors' does not clip; clip > 0 clips the result to [-clip, clip] (--obs-clip)."""

    def __init__(self, dim: int, sample_limit: int, clip: float = 0.0):
        super().__init__()
        self.sample_limit, self.clip = sample_limit, clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / (self.var.sqrt() + 1e-5)
        return x.clamp(-self.clip, self.clip) if self.clip > 0 else x

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])[: max(0, int(self.sample_limit - self.count))]
        if len(x) == 0:  # frozen
            return
        n, total = len(x), self.count + len(x)
        delta = x.mean(0) - self.mean
        # Chan et al.'s merge of two (mean, variance, count) summaries.
        m2 = self.var * self.count + x.var(0, correction=0) * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)


def mlp(in_dim: int, hidden: int = 256) -> nn.Sequential:
    """The paper's torso for both networks: two layers of 256 ReLU units."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class QNetwork(nn.Module):
    """Q(s, a) with the paper's action embedding (Section 4, Neural architectures): the processed observation o
    is gated by a linear embedding of each of the k sampled actions, o * tanh(W a + b), then the value head.
    Where the paper's text has a linear head, this is the authors' Trax Value model: o is projected by a
    linear layer before the gate, the head is LayerNorm, 256 ReLU units, then linear, and the output is
    scaled by 1 / (1 - gamma), so that the network learns returns in per-step units."""

    def __init__(self, obs_dim: int, low: torch.Tensor, high: torch.Tensor, args: Args):
        super().__init__()
        self.torso, self.embed = mlp(obs_dim), nn.Linear(len(low), 256)
        self.torso.append(nn.Linear(256, 256))
        self.head = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        if args.critic_head_init > 0:  # the authors' small head: Q starts near 0 for every action
            nn.init.uniform_(self.head[-1].weight, -args.critic_head_init, args.critic_head_init)
            nn.init.zeros_(self.head[-1].bias)
        self.out_scale, self.clip_actions = 1 / (1 - args.gamma), args.clip_actions == "both"
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [..., obs_dim] (normalised), actions [..., k, act_dim] -> Q [..., k]."""
        o = self.torso(obs).unsqueeze(-2)
        a = self.embed(actions.clamp(self.low, self.high) if self.clip_actions else actions)
        return self.head(o * torch.tanh(a)).squeeze(-1) * self.out_scale


class Actor(nn.Module):
    """Mean of the Gaussian policy; its std is fixed (0.4, Section 4)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim), nn.Linear(256, act_dim))
        # As the authors' code: a near-zero head, so the first policy acts around 0.
        nn.init.uniform_(self.net[-1].weight, -0.01, 0.01)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


# Acting: collection and evaluation
@torch.no_grad()
def collect(envs, obs: np.ndarray, steps_per_env: int, actor, obs_norm, action_std: float, device):
    """Algorithm 2 line 5: steps_per_env vector steps of the Gaussian policy, as tensors [steps, num_envs, ...]
    with the sampled (unclipped) action, mu at s and s', and the (return, length) of each episode that ended."""
    steps, episodes = [], []
    for _ in range(steps_per_env):
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean = actor(obs_norm(obs_t))
        action = mean + action_std * torch.randn_like(mean)
        next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        episode_end = terminated | truncated
        true_next = next_obs.copy()
        for i in np.flatnonzero(episode_end):
            true_next[i] = info["final_obs"][i]
            episodes.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        steps.append((obs_t, action, mean, reward, terminated, episode_end, true_next))
        obs = next_obs
    names = ("obs", "action", "mu_mean", "reward", "terminated", "episode_end", "next_obs")
    # The policy's tensors are stacked where they are; the environment's arrays reach the device in one copy each.
    rollout = {k: torch.stack(c) if torch.is_tensor(c[0]) else torch.as_tensor(np.stack(c), device=device)
               for k, c in zip(names, zip(*steps))}
    rollout["reward"], rollout["next_obs"] = rollout["reward"].float(), rollout["next_obs"].float()
    rollout["mu_std"] = torch.full_like(rollout["mu_mean"], action_std)
    rollout["next_mu_mean"] = actor(obs_norm(rollout["next_obs"]))  # mu at s', from the policy that acted
    return rollout, obs, episodes


@torch.no_grad()
def evaluate(args: Args, actor, obs_norm, device, action_std: float = 0.0, video_folder=None) -> np.ndarray:
    """Returns of eval_episodes episodes of the deterministic policy (the mean action), or with
    action_std > 0 of the sampled Gaussian policy (the paper does not say which its tables report)."""
    envs = make_vec_env(args, args.eval_episodes, video_folder)
    obs, _ = envs.reset(seed=args.seed + 10_000)
    noise = torch.Generator(device).manual_seed(args.seed + 10_000)  # its own stream: evaluating leaves training's alone
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        action = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device)))
        action += action_std * torch.randn(action.shape, generator=noise, device=device)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# The two gradient steps of an iteration (Algorithm 2 lines 11-14 and 17-21)
def critic_step(args: Args, b: dict, critic, target, critic_opt, obs_norm) -> torch.Tensor:
    """One critic gradient step on a batch b of T-step slices (Algorithm 2 lines 12-14);
    returns (loss, mean Q, mean target) as one tensor, on the device."""
    with torch.no_grad():
        # Alg. 2 l.12: k actions a' ~ mu(.|s') at each of the T next states: [B, T, k, act_dim].
        next_actions = sample_actions(b["next_mu_mean"], b["mu_std"], args.n_samples)
        # Alg. 2 l.13: Q* = r + gamma F(Q_target(s', a'_j)), mixed over 1..T steps by TD(lambda).
        q_next = target(obs_norm(b["next_obs"]), next_actions)
        bootstrap = backup_values(q_next, args.backup, args.tau, args.backup_scale)
        y = td_lambda_targets(b["reward"], bootstrap, b["terminated"], b["last"], args.gamma, args.td_lambda)
    q = critic(obs_norm(b["obs"][:, 0]), b["action"][:, :1]).squeeze(-1)
    # Alg. 2 l.14: a gradient step on ||Q* - Q(s, a)||^2, in the network's own units (returns x (1 - gamma)).
    loss = ((q - y) / critic.out_scale).pow(2).mean()
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
    critic_opt.step()
    return torch.stack([loss.detach(), q.detach().mean(), y.mean()])


def actor_step(args: Args, b: dict, actor, critic, actor_opt, obs_norm) -> torch.Tensor:
    """One actor gradient step on a batch b of states (Algorithm 2 lines 18-21); returns the loss, the
    fraction of clipped weights and of policy means at or past the action bounds, on the device."""
    obs = obs_norm(b["obs"][:, 0])
    actions = sample_actions(b["mu_mean"][:, 0], b["mu_std"][:, 0], args.n_samples)  # Alg. 2 l.18: [B, k, d]
    with torch.no_grad():
        # Alg. 2 l.19-20: V = mean_j Q(s, a_j), weights xi = exp((Q - V) / beta), normalised and clipped.
        weights = advantage_weights(critic(obs, actions), args.beta, args.max_weight)
    # Alg. 2 l.21: ascend mean_j xi_j log pi(a_j|s), pi = N(actor(s), action_std) per dimension.
    mean = actor(obs)
    z = (actions - mean.unsqueeze(1)) / args.action_std
    log_prob = (-0.5 * z.pow(2) - math.log(args.action_std * math.sqrt(2 * math.pi))).sum(-1)
    loss = -(weights * log_prob).mean()
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_opt.step()
    at_bound = ((mean.detach() <= critic.low) | (mean.detach() >= critic.high)).float().mean()
    return torch.stack([loss.detach(), (weights >= args.max_weight).float().mean(), at_bound])


def train(args: Args) -> dict:
    """Online QWR (Algorithm 2); returns the final metrics."""
    warnings.filterwarnings("ignore", message=".*is out of date")  # MuJoCo -v4, closest to the paper's gym v2
    action_space = check_env(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    envs = make_vec_env(args, args.num_envs)
    obs_dim, act_dim = envs.single_observation_space.shape[0], action_space.shape[0]
    low, high = (torch.as_tensor(b, dtype=torch.float32, device=device) for b in (action_space.low, action_space.high))
    # Alg. 2 l.1-3: random actor and critic parameters, an empty replay buffer D.
    actor = Actor(obs_dim, act_dim).to(device)
    critic = QNetwork(obs_dim, low, high, args).to(device)
    target = copy.deepcopy(critic).requires_grad_(False)
    obs_norm = ObsNormalizer(obs_dim, args.obs_norm_sample_limit, args.obs_clip).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5)  # eps: the authors' (Trax) Adam's
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    buffer = ReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, obs_dim, act_dim, device)
    saved = dict(actor=actor, critic=critic, target=target, obs_norm=obs_norm, actor_opt=actor_opt, critic_opt=critic_opt)
    start, run_name = 0, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.checkpoint_path:  # the run goes on after its last whole iteration, in its own log directory
        start, run_name = load_checkpoint(args.checkpoint_path, saved, buffer, device)
        torch.manual_seed(args.seed + start)  # not the random numbers of the first iterations again
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start * args.steps_per_iteration + 1)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    torch._inductor.config.fallback_random = True  # compiled code draws the random numbers eager code does
    critic_update = torch.compile(critic_step) if args.compile else critic_step
    actor_update = torch.compile(actor_step) if args.compile else actor_step
    n_iterations = args.total_timesteps // args.steps_per_iteration
    print(f"QWR-{args.backup} on {args.env_id} ({device}), {n_iterations} iterations, logs in runs/{run_name}")
    obs, _ = envs.reset(seed=args.seed + start)
    metrics, start_time = {}, time.time()
    for iteration in range(start, n_iterations):  # Alg. 2 l.4
        iteration_start, step = time.time(), (iteration + 1) * args.steps_per_iteration
        # Alg. 2 l.5: add trajectories sampled by pi_theta to D, each step with the mu that chose it.
        rollout, obs, episodes = collect(envs, obs, args.steps_per_iteration // args.num_envs, actor, obs_norm,
                                         args.action_std, device)
        obs_norm.update(rollout["obs"])
        buffer.add(rollout)
        for ret, length in episodes:
            writer.add_scalar("charts/episodic_return", ret, step)
            writer.add_scalar("charts/episodic_length", length, step)
        critic_sums = torch.zeros(3, device=device)
        for i in range(args.critic_steps):  # Alg. 2 l.6-15
            if i % args.target_update_every == 0:  # Alg. 2 l.8-9: the target network is the critic of now
                target.load_state_dict(critic.state_dict())
            b = buffer.sample(args.batch_size, args.target_horizon)  # Alg. 2 l.11: (s, mu, a, r, s'), T steps on
            critic_sums += critic_update(args, b, critic, target, critic_opt, obs_norm)
        actor_sums = torch.zeros(3, device=device)
        for _ in range(args.actor_steps):  # Alg. 2 l.16-22
            actor_sums += actor_update(args, buffer.sample(args.batch_size, 1), actor, critic, actor_opt, obs_norm)
        # The iteration's means, read once: no host sync inside the update loops.
        metrics = dict(zip(("critic_loss", "q_mean", "target_mean", "actor_loss", "clipped_weight_fraction",
                            "mean_at_bound_fraction"), (torch.cat([critic_sums / max(1, args.critic_steps),
                                                                   actor_sums / max(1, args.actor_steps)])).tolist()))
        if not math.isfinite(metrics["critic_loss"] + metrics["actor_loss"]):
            raise FloatingPointError(f"non-finite losses at step {step}: {metrics}")

        sps = int((step - start * args.steps_per_iteration) / (time.time() - start_time))
        metrics |= dict(global_step=step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        for k in ("critic_loss", "actor_loss", "q_mean", "target_mean", "clipped_weight_fraction"):
            writer.add_scalar(f"losses/{k}", metrics[k], step)
        writer.add_scalar("diagnostics/mean_at_bound_fraction", metrics["mean_at_bound_fraction"], step)
        writer.add_scalar("charts/SPS", sps, step)
        writer.add_scalar("charts/seconds_per_iteration", metrics["seconds_per_iteration"], step)
        line = f"iter {iteration + 1}/{n_iterations} step {step}"
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
            line += f" | train return {metrics['episodic_return']:.1f}"
        if ((iteration + 1) % args.eval_every == 0 or iteration + 1 == n_iterations) and args.eval_episodes > 0:
            video = f"videos/{run_name}/step{step}" if args.capture_video else None
            metrics["eval_return"] = float(evaluate(args, actor, obs_norm, device, 0.0, video).mean())
            metrics["eval_return_sampled"] = float(evaluate(args, actor, obs_norm, device, args.action_std).mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], step)
            writer.add_scalar("charts/eval_return_sampled", metrics["eval_return_sampled"], step)
            line += f" | eval return {metrics['eval_return']:.1f} (sampled {metrics['eval_return_sampled']:.1f})"
        if args.save_model:  # at the iteration's end: a killed run resumes here, redoing at most one iteration
            writer.flush()
            metrics["checkpoint"] = save_checkpoint(f"runs/{run_name}/{args.exp_name}.pt", saved, buffer,
                                                    iteration=iteration + 1, run_name=run_name, args=asdict(args))
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | {sps} SPS, "
              f"{metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
    envs.close()
    writer.close()
    return metrics | {"run_name": run_name}


def check_env(args: Args) -> gym.spaces.Box:
    """The env's action space, or one line saying why this script cannot learn on the env."""
    try:
        env = gym.make(args.env_id, **args.env_kwargs)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make env {args.env_id!r}: {e}")
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box) or not np.isfinite(act.low).all() or not np.isfinite(act.high).all():
        raise SystemExit(f"error: qwr_continuous.py needs a bounded continuous (Box) action space, "
                         f"but {args.env_id} has {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise SystemExit(f"error: qwr_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    if args.total_timesteps % args.steps_per_iteration or args.steps_per_iteration % args.num_envs:
        raise SystemExit("error: --total-timesteps must be a multiple of --steps-per-iteration, "
                         "and that of --num-envs")
    return act


def save_checkpoint(path: str, saved: dict, buffer: ReplayBuffer, **info) -> str:
    """Networks, optimisers, normaliser and replay buffer, written atomically: a run killed while
    writing leaves the previous checkpoint whole."""
    state = {k: v.state_dict() for k, v in saved.items()} | dict(buffer=(buffer.data, buffer.ptr, buffer.size))
    torch.save(state | info, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(path: str, saved: dict, buffer: ReplayBuffer, device) -> tuple[int, str]:
    """Load a checkpoint of save_checkpoint; returns its iterations done and run name."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for k, module in saved.items():
        module.load_state_dict(ckpt[k])
    buffer.data, buffer.ptr, buffer.size = ckpt["buffer"]
    buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True  # the envs restart: no crossing
    return ckpt["iteration"], ckpt["run_name"]


if __name__ == "__main__":
    train(tyro.cli(Args))
