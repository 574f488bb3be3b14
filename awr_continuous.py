"""Advantage-Weighted Regression (AWR) for continuous control (MuJoCo).

AWR (Peng et al., ../shared/papers/awr.md, Algorithm 1; QWR paper Section 2.1,
Algorithm 1 and Eq. 1) is QWR's baseline. Each iteration it
  1. collects about 2048 env steps with a Gaussian policy of fixed std into a
     50K-step replay buffer;
  2. fits a value network V(s) to TD(lambda) returns computed over the stored
     trajectories with the previous iteration's V (200 steps, Section 3.3);
  3. fits the policy by weighted regression on the buffer's own actions,
        max E_(s,a)~D [ log pi(a|s) * min(exp(A(s, a) / beta), 20) ],
     A = R^(s,a) - V(s) normalised over the buffer (1000 steps, Eq. 10).
Where awr.md lost its numbers (OCR) they come from the authors' released
code (xbpeng/awr, awr_configs.py and learning/awr_agent.py): networks
[128, 64], SGD with momentum 0.9, per-environment actor step sizes.
Comments "Alg. 1 l.N" name the lines of Algorithm 1 as ../shared/papers/qwr.md
prints it (awr.md lost the algorithm box).

    python awr_continuous.py --env-id Walker2d-v4
"""

import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """make torch's algorithms deterministic (same seed, same numbers)"""
    cuda: bool = True
    """use CUDA when it is available (the replay buffer and all updates live there)"""
    compile: bool = True
    """torch.compile the critic and actor gradient steps (eager where this machine cannot compile)"""
    cudagraphs: bool = True
    """with --compile on CUDA: replay each gradient step from CUDA graphs (compile's "reduce-overhead" mode)"""
    env_id: str = "Walker2d-v4"
    """gymnasium id of an environment with a continuous (Box) action space"""
    total_timesteps: int = 100_000
    """environment steps in total (QWR's Table 1 compares at 100K)"""
    num_envs: int = 1
    """parallel environments that share the per-iteration step budget"""

    # Schedule (Section 5 of awr.md; authors' awr_configs.py)
    samples_per_iteration: int = 2048
    """environment steps collected per iteration"""
    critic_steps: int = 200
    """value-network gradient steps per iteration"""
    actor_steps: int = 1000
    """policy gradient steps per iteration"""
    batch_size: int = 256
    """states per gradient step, for policy and value network"""
    buffer_size: int = 50_000
    """replay buffer capacity in environment steps"""
    critic_lr: float = 0.01
    """SGD step size of the value network"""
    actor_lr: Optional[float] = None
    """SGD step size of the policy; default: the authors' value for the env (Hopper 1e-4, Walker2d 2.5e-5, ...)"""
    momentum: float = 0.9
    """SGD momentum of both networks"""

    # Targets and weights
    gamma: float = 0.99
    """discount factor"""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) returns"""
    beta: float = 1.0
    """temperature of the advantage weights exp(A / beta), A normalised"""
    max_weight: float = 20.0
    """advantage weights are clipped at this value"""
    action_std: Optional[float] = None
    """fixed std of the Gaussian policy, in units of half the action range; default: the authors' value for the env"""
    action_bound_weight: float = 10.0
    """weight of the penalty on policy means outside the action bounds (authors' code)"""
    obs_norm_sample_limit: int = 300_000
    """observations after which the running mean/std normaliser freezes (authors' normalizer_samples)"""

    # Evaluation, logging, checkpoints
    eval_every: int = 5
    """evaluate the deterministic policy every this many iterations (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    capture_video: bool = False
    """record the first episode of each evaluation to videos/"""
    save_model: bool = False
    """write a checkpoint (networks, optimisers, normaliser, replay buffer, random state) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, in the same run directory, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""


# The authors' per-environment settings (awr_configs.py): actor step size and
# action std; every other hyper-parameter is shared. Keys are gymnasium names
# without the version, so Walker2d-v4 and Walker2d-v5 use the Walker2d-v2 row.
AUTHORS_PER_ENV = {
    "Ant": dict(actor_lr=5e-5, action_std=0.2),
    "HalfCheetah": dict(actor_lr=5e-5, action_std=0.4),
    "Hopper": dict(actor_lr=1e-4, action_std=0.4),
    "Humanoid": dict(actor_lr=1e-5, action_std=0.4),
    "Walker2d": dict(actor_lr=2.5e-5, action_std=0.4),
}
# The defaults of the authors' AWRAgent, used for any other environment.
AUTHORS_DEFAULT = dict(actor_lr=5e-5, action_std=0.2)

SCRIPT = "awr_continuous.py"
# Flags that can break the numbers: a non-finite loss names those set away from their defaults.
SENSITIVE = ("critic_lr", "actor_lr", "momentum", "beta", "max_weight", "action_std", "action_bound_weight", "gamma")


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


class Stop:
    """From the command line, SIGINT (Ctrl-C) or SIGTERM sets Stop.signal: training stops at the next
    safe point (between two gradient steps), writes a checkpoint and says how to resume. A second
    signal stops the process at once."""

    signal: Optional[int] = None

    @classmethod
    def catch_signals(cls) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, cls.request)

    @classmethod
    def request(cls, signum, frame) -> None:
        cls.signal = signum
        signal.signal(signum, signal.SIG_DFL)


# ----------------------------------------------------------------------------
# The math of AWR, as pure functions (tests/ check them against hand values)
# ----------------------------------------------------------------------------


def td_lambda_returns(
    rewards: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    cut: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """TD(lambda) returns R_t of every stored step (awr.md Section 3.3).

    Inputs are [T, ...], oldest step first along dim 0: rewards r_t,
    next_values V(s_{t+1}) at the true next state (also at an episode end),
    terminated_t, and cut_t (the episode ends at t, or t is the newest step
    stored). Within an episode
        R_t = r_t + gamma * ((1 - lam) V(s_{t+1}) + lam R_{t+1}),
    and at a cut R_t = r_t + gamma V(s_{t+1}), with V = 0 after a termination:
    a time-limit truncation bootstraps, a return never crosses an episode.
    As in the authors' code, V is the network of the previous iteration.

    The recursion is linear, R_t = a_t + c_t R_{t+1}, so it is solved for all
    t at once by recursive doubling: log2(T) vector steps instead of a Python
    loop over the 50K stored steps. After the pass with shift s,
    R_t = a_t + c_t R_{t+s} (and R past the newest step is never needed: c = 0
    at a cut).
    """
    next_values = torch.where(terminated, 0.0, next_values)
    cont = (~cut).to(next_values.dtype)
    coef = gamma * lam * cont
    acc = rewards + gamma * (1 - lam * cont) * next_values
    shift = 1
    while shift < len(acc):
        acc = torch.cat([acc[:-shift] + coef[:-shift] * acc[shift:], acc[-shift:]])
        coef = torch.cat([coef[:-shift] * coef[shift:], torch.zeros_like(coef[-shift:])])
        shift *= 2
    return acc


def advantage_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Weights of the policy regression, Eq. 10 with the paper's clipping.

    The advantages of all stored steps are normalised by their mean and std
    (as the authors' code, std + 1e-5), then w = min(exp(A / beta), max_weight),
    computed without overflow.
    """
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


def action_bound_loss(mean: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over states of the squared distance of the policy mean
    (in normalised action units, bounds -1 and 1) outside the bounds."""
    return 0.5 * (mean - mean.clamp(-1.0, 1.0)).pow(2).sum(-1).mean()


# ----------------------------------------------------------------------------
# Environment, replay buffer, observation normaliser, networks
# ----------------------------------------------------------------------------


def make_env(env_id: str, video_folder: Optional[str] = None):
    def thunk():
        env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
        if video_folder:
            env = gym.wrappers.RecordVideo(
                env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True
            )
        return env

    return thunk


def make_vec_env(env_id: str, n: int, video_folder: Optional[str] = None) -> gym.vector.VectorEnv:
    # SAME_STEP autoreset: every step is a real transition; when an episode ends,
    # the returned observation already starts the next one and the true last
    # observation is in info["final_obs"].
    envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, video_folder if i == 0 else None) for i in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)  # info["episode"] at episode ends


class ReplayBuffer:
    """The last `capacity` steps of each env, time-major: data[name][row, env].

    Every step stores (s, a, r, s', terminated) and whether the episode ended
    there; s' is the true final observation at an episode end, which a
    time-limit truncation bootstraps from.
    """

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        shapes = dict(obs=(obs_dim,), action=(act_dim,), reward=(), terminated=(), episode_end=(),
                      next_obs=(obs_dim,))
        self.data = {
            k: torch.zeros((capacity, num_envs) + s, device=device,
                           dtype=torch.bool if k in ("terminated", "episode_end") else torch.float32)
            for k, s in shapes.items()
        }
        self.ptr, self.size = 0, 0

    def add(self, rollout: dict) -> None:
        """Append a rollout of tensors shaped [steps, num_envs, ...]."""
        n = rollout["obs"].shape[0]
        rows = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for k, v in rollout.items():
            self.data[k][rows] = v.to(self.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def chronological(self) -> dict:
        """All stored steps, oldest first: [size, num_envs, ...], and "cut":
        an episode end, or the newest step (whose successor is not stored yet)."""
        rows = (self.ptr - self.size + torch.arange(self.size, device=self.device)) % self.capacity
        out = {k: v[rows] for k, v in self.data.items()}
        out["cut"] = out["episode_end"].clone()
        out["cut"][-1] = True
        return out


class ObsNormalizer(nn.Module):
    """(x - mean) / std with the mean and std of every observation recorded so
    far, until `sample_limit` of them (the authors' state normaliser)."""

    def __init__(self, dim: int, sample_limit: int):
        super().__init__()
        self.sample_limit = sample_limit
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])[: max(0, int(self.sample_limit - self.count))].double()
        if len(x) == 0:
            return
        self.total += x.sum(0)
        self.total_sq += x.pow(2).sum(0)
        self.count += len(x)
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean**2).clamp(min=0)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp(min=1e-4))  # a constant feature never divides by 0


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """The authors' networks: ReLU layers of 128 and 64 units, a linear output,
    Xavier-uniform weights and zero biases (TensorFlow's dense defaults there)."""
    net = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out_dim))
    for layer in net[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


class Actor(nn.Module):
    """Mean of the Gaussian policy in normalised action units (the action
    bounds map to -1 and 1); its std is fixed."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim)
        # As the authors' code: a near-zero head, so the first policy acts around the middle.
        nn.init.uniform_(self.net[-1].weight, -0.01, 0.01)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class Critic(nn.Module):
    """V(s). The network learns V * (1 - gamma), returns in per-step units (the
    authors' value normaliser); forward gives V in return units."""

    def __init__(self, obs_dim: int, gamma: float):
        super().__init__()
        self.net, self.out_scale = mlp(obs_dim, 1), 1 / (1 - gamma)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1) * self.out_scale


@dataclass
class Learner:
    """What AWR learns (Alg. 1 l.1-2) with its optimisers, and the fixed std of its
    Gaussian policy N(actor(s), action_std^2): built, saved and loaded as one."""

    actor: Actor
    critic: Critic
    obs_norm: ObsNormalizer
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    action_std: float

    SAVED = ("actor", "obs_norm", "critic", "actor_opt", "critic_opt")


def make_learner(args: Args, obs_dim: int, act_dim: int, device, actor_lr: float, action_std: float) -> Learner:
    actor, critic = Actor(obs_dim, act_dim).to(device), Critic(obs_dim, args.gamma).to(device)
    return Learner(actor, critic, ObsNormalizer(obs_dim, args.obs_norm_sample_limit).to(device),
                   torch.optim.SGD(actor.parameters(), lr=actor_lr, momentum=args.momentum),
                   torch.optim.SGD(critic.parameters(), lr=args.critic_lr, momentum=args.momentum), action_std)


# ----------------------------------------------------------------------------
# Acting: collection and evaluation
# ----------------------------------------------------------------------------


@torch.no_grad()
def collect(envs, obs: np.ndarray, n_steps: int, actor, obs_norm, action_std: float, device):
    """Run the Gaussian policy for n_steps vector steps (Alg. 1 l.5).

    Returns the rollout as tensors [n_steps, num_envs, ...], the observation to
    continue from, and the (return, length) of each episode that ended.
    """
    low, high = envs.single_action_space.low, envs.single_action_space.high
    mid, half = (high + low) / 2, (high - low) / 2
    steps, episodes = [], []
    for _ in range(n_steps):
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean = actor(obs_norm(obs_t))
        action = mid + half * (mean + action_std * torch.randn_like(mean)).cpu().numpy()
        # The buffer keeps the sampled action, whose likelihood the policy
        # regresses on; the environment gets it clipped to its bounds.
        next_obs, reward, terminated, truncated, info = envs.step(np.clip(action, low, high))
        episode_end = terminated | truncated
        true_next = next_obs.copy()
        for i in np.flatnonzero(episode_end):
            true_next[i] = info["final_obs"][i]
            episodes.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        steps.append((obs, action, reward, terminated, episode_end, true_next))
        obs = next_obs
    names = ("obs", "action", "reward", "terminated", "episode_end", "next_obs")
    rollout = {k: torch.as_tensor(np.stack([s[i] for s in steps]), device=device) for i, k in enumerate(names)}
    for k in ("obs", "action", "reward", "next_obs"):
        rollout[k] = rollout[k].float()
    return rollout, obs, episodes


@torch.no_grad()
def evaluate(env_id: str, n_episodes: int, actor, obs_norm, device, seed: int,
             video_folder: Optional[str] = None) -> np.ndarray:
    """Returns of n_episodes of the deterministic policy (the clipped mean action)."""
    envs = make_vec_env(env_id, n_episodes, video_folder)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=seed)
    returns = np.full(n_episodes, np.nan)
    while np.isnan(returns).any():
        mean = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device))).cpu().numpy()
        obs, _, _, _, info = envs.step(np.clip((high + low) / 2 + (high - low) / 2 * mean, low, high))
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# ----------------------------------------------------------------------------
# The two regressions of an iteration (Alg. 1 l.6-9 and l.10-14)
# ----------------------------------------------------------------------------


@torch.no_grad()
def buffer_returns(args: Args, buffer: ReplayBuffer, learner: Learner):
    """Every stored step's state, action, V(s) and TD(lambda) return R (Section 3.3),
    flattened over (time, env)."""
    d = buffer.chronological()
    values, next_values = (learner.critic(learner.obs_norm(d[k])) for k in ("obs", "next_obs"))
    returns = td_lambda_returns(d["reward"], next_values, d["terminated"], d["cut"], args.gamma, args.td_lambda)
    return tuple(x.flatten(0, 1) for x in (d["obs"], d["action"], values, returns))


def critic_step(args: Args, learner: Learner, states: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """One regression step of V(s) on the fixed TD(lambda) returns of a batch of states (Alg. 1 l.8);
    returns the loss."""
    v = learner.critic(learner.obs_norm(states))
    # Alg. 1 l.8: a step on ||R - V(s)||^2, in the network's own units, with the authors' factor 1/2.
    loss = 0.5 * ((v - returns) / learner.critic.out_scale).pow(2).mean()
    learner.critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.critic_opt.step()
    return loss.detach()


def train_critic(args: Args, learner: Learner, states: torch.Tensor, returns: torch.Tensor, n_steps: int,
                 step=critic_step) -> dict:
    """Alg. 1 l.6-9: n_steps regressions of V(s) (fewer after a Stop); `step` is critic_step or its
    compiled twin."""
    sums, taken = torch.zeros(1, device=states.device), 0
    for _ in range(n_steps):
        if Stop.signal:  # the safe point: between two gradient steps
            break
        i = torch.randint(0, len(states), (args.batch_size,), device=states.device)  # Alg. 1 l.7: s ~ D
        sums, taken = sums + step(args, learner, states[i], returns[i]), taken + 1
    return {"critic_loss": (sums / max(1, taken)).item()}


def actor_step(args: Args, learner: Learner, states: torch.Tensor, actions: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """One step of weighted maximum likelihood on a batch (Alg. 1 l.12-13, Eq. 10); returns the loss."""
    mean = learner.actor(learner.obs_norm(states))
    # log N(a; mean, std), written out: a non-finite mean reaches the loss check (no distribution validation).
    z = (actions - mean) / learner.action_std
    log_prob = (-0.5 * z.pow(2) - math.log(learner.action_std * math.sqrt(2 * math.pi))).sum(-1)
    # Alg. 1 l.13: ascend xi log pi(a|s).
    loss = -(weights * log_prob).mean() + args.action_bound_weight * action_bound_loss(mean)
    learner.actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.actor_opt.step()
    return loss.detach()


def train_actor(args: Args, learner: Learner, states: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor,
                n_steps: int, step=actor_step) -> dict:
    """Alg. 1 l.10-14 (Eq. 10): n_steps of weighted maximum likelihood of the stored
    actions (in the policy's units) with the weights xi, plus the authors' action-bound penalty
    (fewer after a Stop); `step` is actor_step or its compiled twin."""
    sums, taken = torch.zeros(1, device=states.device), 0
    for _ in range(n_steps):
        if Stop.signal:
            break
        i = torch.randint(0, len(states), (args.batch_size,), device=states.device)  # Alg. 1 l.11: (s, a) ~ D
        sums, taken = sums + step(args, learner, states[i], actions[i], weights[i]), taken + 1
    return {"actor_loss": (sums / max(1, taken)).item()}


def compiled(fn, args: Args, device: torch.device):
    """torch.compile(fn) with --compile, where this machine can compile (on CPU it needs a C++
    compiler); else fn itself, eager, said in one line. On CUDA with --cudagraphs, compile's
    "reduce-overhead" mode: each call replays CUDA graphs, one launch per compiled piece instead of
    one per kernel (these small networks are launch-bound on a GPU). A call's outputs live in the
    graphs' memory, which the next call overwrites, so each call starts a new step and returns a copy."""
    if not args.compile:
        return fn
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except Exception as e:
        print(f"--compile: torch.compile does not work here ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
              "running eager")
        return fn
    torch._inductor.config.fallback_random = True  # draw the same random numbers as eager code does
    if device.type != "cuda" or not args.cudagraphs:
        return torch.compile(fn)
    graphed = torch.compile(fn, mode="reduce-overhead")

    def step(*a, **kw):
        torch.compiler.cudagraph_mark_step_begin()
        return graphed(*a, **kw).clone()

    return step


# ----------------------------------------------------------------------------
# Around the loop: the command line, seeds, logs, checkpoints, evaluation
# ----------------------------------------------------------------------------


def authors_setting(env_id: str) -> dict:
    """The authors' actor step size and action std for env_id (see AUTHORS_PER_ENV)."""
    return AUTHORS_PER_ENV.get(env_id.split("/")[-1].split("-")[0], AUTHORS_DEFAULT)


def check_args(args: Args) -> None:
    """Raise UsageError for a bad command line, before anything is built."""
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {args.env_id!r}: {e}") from None
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box):
        raise UsageError(
            f"awr_continuous.py needs a continuous (Box) action space, but {args.env_id} has {act}"
        )
    if not np.all(np.isfinite(act.low)) or not np.all(np.isfinite(act.high)):
        raise UsageError(f"{args.env_id}'s action space has infinite bounds: {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise UsageError(f"awr_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    problems = [
        (args.samples_per_iteration % args.num_envs != 0,
         "--samples-per-iteration must be a multiple of --num-envs"),
        (args.total_timesteps % args.num_envs != 0, "--total-timesteps must be a multiple of --num-envs"),
        (args.buffer_size < args.samples_per_iteration,
         "--buffer-size must hold at least one iteration of steps"),
        (min(args.batch_size, args.num_envs, args.total_timesteps) < 1,
         "--batch-size, --num-envs and --total-timesteps must be >= 1"),
        (min(args.critic_steps, args.actor_steps, args.eval_episodes) < 0,
         "step and episode counts cannot be negative"),
        (not 0 <= args.td_lambda <= 1, "--td-lambda must be in [0, 1]"),
        (not 0 < args.gamma < 1, "--gamma must be in (0, 1): values are learned in units of 1/(1-gamma)"),
        (min(args.beta, args.max_weight, args.critic_lr) <= 0,
         "--beta, --max-weight and --critic-lr must be > 0"),
        ((args.actor_lr is not None and args.actor_lr <= 0)
         or (args.action_std is not None and args.action_std <= 0),
         "--actor-lr and --action-std must be > 0"),
        (not 0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.eval_every < 1, "--eval-every must be >= 1"),
        (args.eval_only and not args.checkpoint_path, "--eval-only needs --checkpoint-path"),
        (args.checkpoint_path and not os.path.isfile(args.checkpoint_path),
         f"checkpoint not found: {args.checkpoint_path}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def seed_and_device(args: Args) -> torch.device:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.capture_video and sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # render without a screen
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


def open_writer(args: Args, run_name: str) -> SummaryWriter:
    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def load_checkpoint(args: Args, learner: Learner, buffer: ReplayBuffer) -> tuple[int, Optional[str]]:
    """Load --checkpoint-path into learner (and, to resume, into buffer and the random streams); return
    its global step and run name. A file that does not fit this run is refused with one line naming it
    and the mismatch."""
    path = args.checkpoint_path
    try:
        ckpt = torch.load(path, map_location=buffer.device, weights_only=False)
    except Exception as e:  # not a file torch can read: say so, not a pickle stack trace
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise UsageError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} (it holds a {type(ckpt).__name__})")
    missing = [k for k in (*Learner.SAVED, "args", "global_step", "buffer") if k not in ckpt]
    if ckpt.get("script", SCRIPT) != SCRIPT or missing:  # (older checkpoints have no "script")
        why = ckpt["script"] if ckpt.get("script", SCRIPT) != SCRIPT else "no " + ", ".join(missing)
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} ({why})")
    if ckpt["args"]["env_id"] != args.env_id:
        raise UsageError(f"{path} was trained on {ckpt['args']['env_id']}, not {args.env_id}")
    for k in ("actor", "obs_norm") if args.eval_only else Learner.SAVED:
        try:
            getattr(learner, k).load_state_dict(ckpt[k])
        except (RuntimeError, ValueError, KeyError) as e:  # another network size or optimiser
            raise UsageError(f"{path}: its {k} does not fit this run's ({str(e).strip().splitlines()[-1][:160]})")
    if args.eval_only:
        return 0, ckpt.get("run_name")
    if ckpt["buffer"]["obs"].shape != buffer.data["obs"].shape:
        raise UsageError(f"{path}: resume with the checkpoint's --buffer-size {ckpt['args']['buffer_size']} and "
                         f"--num-envs {ckpt['args']['num_envs']}")
    buffer.data, buffer.ptr, buffer.size = ckpt["buffer"], ckpt["buffer_ptr"], ckpt["buffer_size"]
    # The environments restart, so the stored episode in progress ends here.
    buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True
    if "rng" in ckpt:  # the random streams go on where they stopped
        random.setstate(ckpt["rng"]["python"])
        np_state = ckpt["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], np.uint32), *np_state[2:]))
        torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["global_step"], ckpt.get("run_name")


def save_checkpoint(args: Args, learner: Learner, buffer: ReplayBuffer, run_name: str, global_step: int) -> str:
    """Write runs/<run>/<exp_name>.pt atomically (a run killed mid-write leaves the last good checkpoint)."""
    path = f"runs/{run_name}/{args.exp_name}.pt"
    np_state = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
               torch=torch.get_rng_state())
    torch.save({k: getattr(learner, k).state_dict() for k in Learner.SAVED} | dict(
        script=SCRIPT, args=asdict(args), global_step=global_step, run_name=run_name, rng=rng, buffer=buffer.data,
        buffer_ptr=buffer.ptr, buffer_size=buffer.size), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def resume_command(args: Args, path: str) -> str:
    """The command line that continues this run from the checkpoint at path."""
    defaults = asdict(Args())
    flags = [(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
             else f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items()
             if v != defaults[k] and k != "checkpoint_path"]
    return shlex.join(["python", SCRIPT, *flags, f"--checkpoint-path={path}"])


def end_of_iteration(args: Args, writer, learner: Learner, buffer: ReplayBuffer, metrics: dict,
                     evaluate_now: bool, run_name: str) -> str:
    """Log an iteration's metrics; when evaluate_now, evaluate the deterministic policy and
    write a checkpoint if asked. Returns the status line's evaluation part."""
    step = metrics["global_step"]
    if not all(math.isfinite(metrics[k]) for k in ("critic_loss", "actor_loss", "value_mean")):
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SENSITIVE
                   if getattr(args, k) != getattr(Args(), k)]
        raise FloatingPointError(f"non-finite losses at step {step} (critic {metrics['critic_loss']}, actor "
                                 f"{metrics['actor_loss']}); likely cause: {', '.join(changed) or 'none of the flags'}")
    for k in ("critic_loss", "actor_loss", "value_mean", "return_mean", "clipped_weight_fraction"):
        writer.add_scalar(f"losses/{k}", metrics[k], step)
    writer.add_scalar("charts/SPS", metrics["sps"], step)
    writer.add_scalar("charts/seconds_per_iteration", metrics["seconds_per_iteration"], step)
    if not evaluate_now or args.eval_episodes == 0:
        return ""
    video = f"videos/{run_name}/step{step}" if args.capture_video else None
    returns = evaluate(args.env_id, args.eval_episodes, learner.actor, learner.obs_norm, buffer.device,
                       args.seed + 10_000, video)
    metrics["eval_return"] = float(returns.mean())
    writer.add_scalar("charts/eval_return", metrics["eval_return"], step)
    if args.save_model:
        metrics["checkpoint"] = save_checkpoint(args, learner, buffer, run_name, step)
    return f" | eval return {metrics['eval_return']:.1f}"


# ----------------------------------------------------------------------------
# Training (Algorithm 1)
# ----------------------------------------------------------------------------


def train(args: Args) -> dict:
    """AWR (Algorithm 1); returns the final metrics."""
    check_args(args)
    setting = authors_setting(args.env_id)
    actor_lr = args.actor_lr if args.actor_lr is not None else setting["actor_lr"]
    action_std = args.action_std if args.action_std is not None else setting["action_std"]
    device = seed_and_device(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    envs = make_vec_env(args.env_id, args.num_envs)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = (torch.as_tensor(b, dtype=torch.float32, device=device)
                 for b in (envs.single_action_space.low, envs.single_action_space.high))
    # Alg. 1 l.1-3: random actor and critic parameters, an empty replay buffer D.
    learner = make_learner(args, obs_dim, act_dim, device, actor_lr, action_std)
    buffer = ReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, obs_dim, act_dim, device)
    global_step = 0
    if args.checkpoint_path:  # the same run goes on: its log directory, step counter and random state
        global_step, saved_name = load_checkpoint(args, learner, buffer)
        run_name = saved_name or run_name
    if args.eval_only:  # evaluate the checkpoint's policy, nothing else
        eval_returns = evaluate(args.env_id, args.eval_episodes, learner.actor, learner.obs_norm, device,
                                args.seed + 10_000, f"videos/{run_name}" if args.capture_video else None)
        print(f"eval return {eval_returns.mean():.1f} +- {eval_returns.std():.1f} over {len(eval_returns)} episodes")
        return {"eval_return": float(eval_returns.mean()), "eval_returns": eval_returns.tolist()}
    writer = open_writer(args, run_name)
    n_iterations = math.ceil(args.total_timesteps / args.samples_per_iteration)
    print(f"AWR on {args.env_id} ({device}), {n_iterations} iterations, actor lr {actor_lr}, "
          f"action std {action_std}, logs in runs/{run_name}")
    iteration = global_step // args.samples_per_iteration
    # A resumed run restarts its episodes; a new seed keeps them from repeating the first iteration's.
    obs, _ = envs.reset(seed=args.seed + iteration)
    critic_update, actor_update = compiled(critic_step, args, device), compiled(actor_step, args, device)
    start_time, start_step = time.time(), global_step
    metrics: dict = {"eval_return": float("nan")}
    while global_step < args.total_timesteps:  # Alg. 1 l.4
        iteration_start = time.time()
        # Alg. 1 l.5: add trajectories sampled by pi_theta to D.
        n_new = min(args.samples_per_iteration, args.total_timesteps - global_step)
        rollout, obs, episodes = collect(envs, obs, n_new // args.num_envs, learner.actor, learner.obs_norm,
                                         action_std, device)
        learner.obs_norm.update(rollout["obs"])
        buffer.add(rollout)
        global_step += n_new
        iteration += 1
        for ret, length in episodes:
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/episodic_length", length, global_step)

        # A short last iteration takes proportionally fewer steps (authors' code).
        fraction = n_new / args.samples_per_iteration
        critic_steps, actor_steps = (math.ceil(steps * fraction) for steps in (args.critic_steps, args.actor_steps))
        # Alg. 1 l.6-9: V regresses on returns R computed with the previous iteration's V, fixed meanwhile ...
        states, _, _, returns = buffer_returns(args, buffer, learner)
        metrics |= train_critic(args, learner, states, returns, critic_steps, critic_update)
        # ... then the advantages use the new V, as the authors' code recomputes them.
        states, actions, values, returns = buffer_returns(args, buffer, learner)
        # Alg. 1 l.12: xi = exp(A / beta) with A = R - V(s), for all of D at once (normalised over it).
        weights = advantage_weights(returns - values, args.beta, args.max_weight)
        unit_actions = (actions - (high + low) / 2) / ((high - low) / 2)  # the policy's units: bounds at -1 and 1
        metrics |= train_actor(args, learner, states, unit_actions, weights, actor_steps, actor_update)  # l.10-14

        sps = int((global_step - start_step) / (time.time() - start_time))
        metrics.update(value_mean=values.mean().item(), return_mean=returns.mean().item(),
                       clipped_weight_fraction=(weights >= args.max_weight).float().mean().item(),
                       global_step=global_step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        line = f"iter {iteration}/{n_iterations} step {global_step}"
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
            line += f" | train return {metrics['episodic_return']:.1f}"
        evaluate_now = iteration % args.eval_every == 0 or global_step >= args.total_timesteps
        line += end_of_iteration(args, writer, learner, buffer, metrics, evaluate_now, run_name)
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | {sps} SPS, "
              f"{metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
        if Stop.signal:  # this iteration's remaining updates were skipped; save the run as it stands
            path = os.path.abspath(save_checkpoint(args, learner, buffer, run_name, global_step))
            print(f"stopped by {signal.Signals(Stop.signal).name} after iteration {iteration}, saved; resume with: "
                  f"{resume_command(args, path)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + Stop.signal)
    envs.close()
    writer.close()
    print(f"done: eval return {metrics['eval_return']:.1f} at step {global_step}, "
          f"{(time.time() - start_time) / 60:.1f} min")
    return metrics | {"run_name": run_name}


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    Stop.catch_signals()
    try:
        train(cli_args)
    except UsageError as e:
        sys.exit(f"error: {e}")
