"""Q-Value Weighted Regression (QWR) on Atari, the 100K-interaction protocol.

QWR (Kozakowski et al., ../shared/papers/qwr.md, Algorithm 2; Section 4 and
Table 2) with the hyper-parameters of its MuJoCo runs (Table 4) and the
convolutional networks of Mnih et al. (2013). With discrete actions:
  - the sampling policy mu stored with each step is the categorical
    distribution that acted (its probabilities over all actions);
  - critic targets are T = 3-step TD(lambda) targets whose bootstrap F
    (mean, max or log-sum-exp, Eq. 6) aggregates Q over k = 4 actions
    sampled from the stored mu at the next state, as in the continuous case;
  - the actor loss sums exactly over all actions instead of sampling
    (Section 4.1): -sum_a mu(a|s) w(s, a) log pi(a|s), w = min(exp(A/beta), 20).
Preprocessing is Appendix 6.1's: 4 frames per action with the max of the
last 2, grey 84x84, 4 stacked frames, 0-30 no-ops, rewards clipped to
[-1, 1] for training only, 2000 interactions per training episode and 10K
per evaluation episode. Frames are stored once, not once per stack.

    python qwr_atari.py --env-id BreakoutNoFrameskip-v4
"""

import copy
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

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
    """run the critic and actor steps through torch.compile (eager where it cannot compile)"""
    cudagraphs: bool = True
    """with --compile on CUDA: replay each gradient step from CUDA graphs (compile's "reduce-overhead" mode)"""
    env_id: str = "BreakoutNoFrameskip-v4"
    """an Atari game: <Game>NoFrameskip-v4, or ALE/<Game>-v5 (made with frame skip 1, no sticky actions)"""
    total_timesteps: int = 100_000
    """agent interactions in total (Atari 100K; one interaction = 4 frames)"""
    num_envs: int = 1
    """parallel games that share the per-iteration interaction budget"""

    # Algorithm 2 schedule (Table 4, as on MuJoCo)
    steps_per_iteration: int = 1000
    """interactions collected per iteration"""
    critic_steps: int = 1000
    """critic gradient steps per iteration"""
    actor_steps: int = 1000
    """actor gradient steps per iteration"""
    target_update_every: int = 100
    """critic steps between copies of the critic into the target"""
    batch_size: int = 256
    """states per gradient step"""
    buffer_size: int = 50_000
    """replay buffer capacity in interactions"""
    critic_lr: float = 5e-4
    """Adam learning rate of the critic"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor"""

    # Critic targets
    backup: Literal["lse", "max", "mean"] = "lse"
    """backup F over the k sampled actions: log-sum-exp (QWR-LSE), max or mean (QWR-AVG)"""
    tau: float = 0.3
    """log-sum-exp temperature (the 100K setting)"""
    backup_scale: Literal["mad", "std", "none"] = "mad"
    """scale s(X) of Eq. 6 over the batch: mean absolute deviation (100K), standard deviation, or 1"""
    n_samples: int = 4
    """k, actions sampled from the stored mu of each next state for the backup"""
    target_horizon: int = 3
    """T, the horizon of the multi-step targets"""
    td_lambda: float = 0.95
    """lambda of the truncated TD(lambda) mix of the 1..T-step targets"""
    gamma: float = 0.99
    """discount factor"""
    critic_head: Literal["mlp", "linear"] = "mlp"
    """value head after the action gate: LayerNorm + 256 ReLU + linear (authors' code), or linear"""
    scale_value_targets: bool = True
    """critic outputs Q * (1 - gamma) (per-step units), as the authors' code does"""

    # Actor and networks
    beta: float = 1.0
    """temperature of the advantage weights exp(A / beta)"""
    max_weight: float = 20.0
    """advantage weights are clipped at this value"""
    torso: Literal["mnih2013", "nature"] = "mnih2013"
    """convolutional torso: Mnih et al. 2013 (the paper's), or the larger Nature DQN one"""

    # Atari protocol (Appendix 6.1, early appendix)
    train_episode_steps: int = 2000
    """interactions per training episode before it is truncated"""
    eval_episode_steps: int = 10_000
    """interactions per evaluation episode before it is truncated"""
    noop_max: int = 30
    """up to this many no-op actions at the start of each episode"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every this many iterations (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, with the policy's sampled actions and raw (unclipped) rewards"""
    capture_video: bool = False
    """record the first episode of each evaluation to videos/"""
    save_model: bool = False
    """write a checkpoint (networks, optimisers, replay buffer) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


def first_line(e: Exception) -> str:
    """An exception's message in one line, for an error that must stay one line."""
    return (str(e).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------
# The math: backups, TD(lambda) targets, the exact discrete actor loss
# ----------------------------------------------------------------------------


def backup_values(q: torch.Tensor, kind: str, tau: float, scale: str) -> torch.Tensor:
    """Backup F (Section 2.3, Eq. 6) over the k sampled Q-values in q[..., k].

    "mean", "max", or "lse" = s tau (logsumexp(X / (s tau)) - log k) with ONE
    scale s over every Q-value of the batch, as the authors' code does: mean
    absolute deviation, standard deviation or 1. s = 0 gives the mean.
    """
    if kind == "mean":
        return q.mean(-1)
    if kind == "max":
        return q.amax(-1)
    if kind != "lse":
        raise ValueError(f"unknown backup {kind!r}")
    s = {"mad": lambda: (q - q.mean()).abs().mean(), "std": lambda: q.std(correction=0),
         "none": lambda: torch.ones((), dtype=q.dtype, device=q.device)}[scale]()
    temp = s * tau
    safe_temp = torch.where(temp > 0, temp, torch.ones_like(temp))  # no NaN value or gradient at s = 0
    # temp * log mean exp(q / temp) as top + temp * log1p(mean(expm1((q - top) / temp))), top = max q:
    # no overflow, and no float32 cancellation of log(k) at high temperatures (F near the mean).
    top = q.amax(-1, keepdim=True)
    lse = top.squeeze(-1) + safe_temp * torch.log1p(torch.expm1((q - top) / safe_temp).mean(-1))
    return torch.where(temp > 0, lse, q.mean(-1))


def td_lambda_targets(rewards, bootstrap, terminated, last, gamma: float, lam: float) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices (Appendix 6.4).

    Inputs [..., T] along a stored trajectory. Weights (1 - lam) lam^(n-1) on
    the n-step targets, the remainder lam^(T-1) on the T-step one; a
    termination stops bootstrapping, a truncation bootstraps from the final
    observation, and a slice stops at an episode end or the newest step.
    """
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def exact_actor_loss(logits: torch.Tensor, mu: torch.Tensor, q: torch.Tensor, beta: float,
                     max_weight: float) -> torch.Tensor:
    """Eq. 3 summed over all actions: -mean_s sum_a mu(a|s) w(s, a) log pi(a|s).

    A(s, a) = Q(s, a) - sum_a' mu(a'|s) Q(s, a') (V_mu exactly), normalised over
    every (state, action) of the batch, w = min(exp(A / beta), max_weight).
    """
    adv = q - (mu * q).sum(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    weights = torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))
    return -(mu * weights * torch.log_softmax(logits, -1)).sum(-1).mean()


# ----------------------------------------------------------------------------
# Environment, replay buffer of single frames, networks
# ----------------------------------------------------------------------------


def make_env(env_id: str, max_steps: int, noop_max: int, video_folder: Optional[str] = None):
    def thunk():
        import ale_py

        gym.register_envs(ale_py)
        # ALE/<Game>-v5 skips frames and repeats actions by default; the protocol wants neither.
        kwargs = dict(frameskip=1, repeat_action_probability=0.0) if env_id.startswith("ALE/") else {}
        env = gym.make(env_id, render_mode="rgb_array" if video_folder else None, **kwargs)
        if video_folder:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0,
                                           disable_logger=True)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
        env = gym.wrappers.TimeLimit(env, max_steps)  # counted in interactions (4 frames each)
        return gym.wrappers.FrameStackObservation(env, 4)  # padded with the reset frame

    return thunk


def make_vec_env(env_id: str, n: int, max_steps: int, noop_max: int, video_folder: Optional[str] = None):
    envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, max_steps, noop_max, video_folder if i == 0 else None) for i in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)  # raw returns: clipping happens in the buffer


def check_args(args: Args) -> None:
    """Raise UsageError for a bad command line, before anything is built."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {args.env_id!r}: {e}") from None
    act, is_atari = env.action_space, hasattr(env.unwrapped, "ale")
    env.close()
    if not isinstance(act, gym.spaces.Discrete):
        raise UsageError(f"qwr_atari.py needs a discrete action space, but {args.env_id} has {act} "
                         f"(for MuJoCo, use qwr_continuous.py)")
    if not is_atari:
        raise UsageError(f"qwr_atari.py needs an Atari (ALE) game, and {args.env_id} is not one")
    problems = [
        (args.total_timesteps % args.steps_per_iteration != 0,
         "--total-timesteps must be a multiple of --steps-per-iteration"),
        (args.steps_per_iteration % args.num_envs != 0, "--steps-per-iteration must be a multiple of --num-envs"),
        (args.buffer_size < args.steps_per_iteration, "--buffer-size must hold at least one iteration"),
        (min(args.n_samples, args.target_horizon, args.batch_size, args.num_envs) < 1,
         "--n-samples, --n-steps, --batch-size and --num-envs must be >= 1"),
        (not 0 <= args.td_lambda <= 1, "--td-lambda must be in [0, 1]"),
        (not 0 < args.gamma < 1, "--gamma must be in (0, 1)"),
        (args.backup == "lse" and args.tau <= 0, "--tau must be > 0 for the lse backup"),
        (min(args.beta, args.max_weight, args.actor_lr, args.critic_lr) <= 0,
         "--beta, --max-weight and the learning rates must be > 0"),
        (min(args.train_episode_steps, args.eval_episode_steps, args.eval_every, args.target_update_every) < 1,
         "episode caps, --eval-every and --target-update-every must be >= 1"),
        (args.eval_only and not args.checkpoint_path, "--eval-only needs --checkpoint-path"),
        (args.checkpoint_path and not os.path.isfile(args.checkpoint_path),
         f"checkpoint not found: {args.checkpoint_path}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


class FrameReplayBuffer:
    """Transitions [capacity, num_envs] that point into each env's stream of
    single 84x84 uint8 frames: every interaction appends the newest frame of
    its next observation, an episode's start its reset frame. The stacked
    observation at a step is its frame and the 3 before it, clamped to the
    episode's first frame (FrameStackObservation's reset padding); the next
    observation is one frame further, the true final one at an episode end.
    A stack is then 4 frames read, never stored: a 50K buffer holds at most
    2 x 50K frames (700 MB) instead of 2 x 4 x 50K.

    Each step also stores the categorical sampling policy mu that acted (its
    probabilities) at s, and at s' for the backup.
    """

    def __init__(self, capacity: int, num_envs: int, n_actions: int, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        # Each step adds one frame, each episode one more: 2 x capacity (+ a stack) keeps every live stack.
        self.frame_capacity = 2 * capacity + 8
        self.frames = torch.zeros((self.frame_capacity, num_envs, 84, 84), dtype=torch.uint8, device=device)
        self.frame_count = np.zeros(num_envs, dtype=np.int64)  # frames ever written, per env
        self.episode_first = np.zeros(num_envs, dtype=np.int64)  # absolute index of the episode's first frame
        shapes = dict(frame=((), torch.long), first=((), torch.long), action=((), torch.long),
                      mu=((n_actions,), torch.float32), next_mu=((n_actions,), torch.float32),
                      reward=((), torch.float32), terminated=((), torch.bool), episode_end=((), torch.bool))
        self.data = {k: torch.zeros((capacity, num_envs) + s, dtype=d, device=device) for k, (s, d) in shapes.items()}
        self.ptr, self.size = 0, 0

    def push_frames(self, frames: np.ndarray, envs: np.ndarray, new_episode: bool) -> None:
        """Append one frame [len(envs), 84, 84] to each of the given envs' streams."""
        idx = self.frame_count[envs]
        self.frames[torch.as_tensor(idx % self.frame_capacity), torch.as_tensor(envs)] = torch.as_tensor(
            frames, device=self.device)
        if new_episode:
            self.episode_first[envs] = idx
        self.frame_count[envs] += 1

    def current_frame(self) -> np.ndarray:
        """Absolute index of each env's newest frame (that of its current observation)."""
        return self.frame_count - 1

    def add(self, step: dict) -> None:
        """One vector step: frame/first of s, action, mu, next_mu, reward, terminated, episode_end."""
        for k, v in step.items():
            self.data[k][self.ptr] = torch.as_tensor(v, device=self.device)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def stacks(self, frame: torch.Tensor, first: torch.Tensor, env: torch.Tensor, offset: int) -> torch.Tensor:
        """The 4-frame stacks ending at frame + offset (0: s, 1: s'): [..., 4, 84, 84] uint8."""
        idx = frame[..., None] + offset + torch.arange(-3, 1, device=self.device)
        idx = torch.maximum(idx, first[..., None]) % self.frame_capacity
        return self.frames[idx, env[..., None].expand_as(idx)]

    def sample(self, batch_size: int, horizon: int) -> dict:
        """Slices of `horizon` consecutive steps [B, T, ...]; "last" marks where a
        slice must stop (an episode end, or the newest stored step)."""
        row = torch.randint(0, self.size, (batch_size,), device=self.device)
        env = torch.randint(0, self.num_envs, (batch_size,), device=self.device)
        rows = (row[:, None] + torch.arange(horizon, device=self.device)) % self.capacity
        envs = env[:, None].expand_as(rows)
        out = {k: v[rows, envs] for k, v in self.data.items()}
        out["last"] = out["episode_end"] | (rows == (self.ptr - 1) % self.capacity)
        out["obs"] = self.stacks(out["frame"][:, 0], out["first"][:, 0], env, 0)
        out["next_obs"] = self.stacks(out["frame"], out["first"], envs, 1)
        return out


def torso(kind: str) -> tuple[nn.Sequential, int]:
    """Mnih et al. (2013): 16 8x8/4, 32 4x4/2, 256 units; or the Nature DQN torso."""
    if kind == "mnih2013":
        layers = [nn.Conv2d(4, 16, 8, 4), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten(),
                  nn.Linear(32 * 9 * 9, 256), nn.ReLU()]
        return nn.Sequential(*layers), 256
    layers = [nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(), nn.Conv2d(64, 64, 3, 1),
              nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU()]
    return nn.Sequential(*layers), 512


class QNetwork(nn.Module):
    """Q(s, .) for every action with the paper's action embedding (Section 4):
    o * tanh(W a + b) with a one-hot, i.e. one learned gate vector per action,
    then the value head (see qwr_continuous.py's critic)."""

    def __init__(self, n_actions: int, kind: str, out_scale: float, head: str = "mlp"):
        super().__init__()
        self.torso, hidden = torso(kind)
        self.embed = nn.Linear(n_actions, hidden)
        if head == "mlp":
            self.torso.append(nn.Linear(hidden, hidden))
            self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 256), nn.ReLU(), nn.Linear(256, 1))
        else:
            self.head = nn.Linear(hidden, 1)
        self.out_scale = out_scale

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [..., 4, 84, 84] uint8 -> Q [..., n_actions]."""
        o = self.torso(frames.reshape((-1,) + frames.shape[-3:]).float() / 255.0)
        gates = torch.tanh(self.embed.weight.T + self.embed.bias)  # [n_actions, hidden]: W e_a + b
        q = self.head(o[:, None, :] * gates).squeeze(-1) * self.out_scale
        return q.reshape(frames.shape[:-3] + (-1,))


class Actor(nn.Module):
    """Logits of the categorical policy."""

    def __init__(self, n_actions: int, kind: str):
        super().__init__()
        self.torso, hidden = torso(kind)
        self.head = nn.Linear(hidden, n_actions)
        nn.init.uniform_(self.head.weight, -0.01, 0.01)  # a near-uniform first policy
        nn.init.zeros_(self.head.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(frames.reshape((-1,) + frames.shape[-3:]).float() / 255.0)).reshape(
            frames.shape[:-3] + (-1,))


# ----------------------------------------------------------------------------
# Data collection, evaluation, training
# ----------------------------------------------------------------------------


@torch.no_grad()
def collect(envs, obs: np.ndarray, steps_per_env: int, actor, buffer: FrameReplayBuffer, device) -> tuple:
    """Act for steps_per_env vector steps, writing frames and transitions into the buffer."""
    episodes = []
    all_envs = np.arange(envs.num_envs)
    probs = torch.softmax(actor(torch.as_tensor(obs, device=device)), -1)
    for _ in range(steps_per_env):
        action = torch.multinomial(probs, 1).squeeze(-1)
        next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        ended = terminated | truncated
        true_next = next_obs.copy()
        for i in np.flatnonzero(ended):
            true_next[i] = info["final_obs"][i]
            episodes.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        frame, first = buffer.current_frame(), buffer.episode_first.copy()
        buffer.push_frames(true_next[:, -1], all_envs, new_episode=False)
        next_mu = torch.softmax(actor(torch.as_tensor(true_next, device=device)), -1)
        buffer.add(dict(frame=frame, first=first, action=action, mu=probs, next_mu=next_mu,
                        reward=np.clip(reward, -1.0, 1.0), terminated=terminated, episode_end=ended))
        # mu at s' is the policy of the next step, except where a new episode began.
        probs = next_mu.clone()
        if ended.any():  # the new episodes start their own frame streams from their reset frames
            buffer.push_frames(next_obs[ended][:, -1], np.flatnonzero(ended), new_episode=True)
            probs[torch.as_tensor(ended)] = torch.softmax(actor(torch.as_tensor(next_obs[ended], device=device)), -1)
        obs = next_obs
    return obs, episodes


@torch.no_grad()
def evaluate(args: Args, actor, device, seed: int, video_folder: Optional[str] = None) -> np.ndarray:
    """Raw returns of eval_episodes episodes, acting with the policy's samples."""
    envs = make_vec_env(args.env_id, args.eval_episodes, args.eval_episode_steps, args.noop_max, video_folder)
    obs, _ = envs.reset(seed=seed)
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        probs = torch.softmax(actor(torch.as_tensor(obs, device=device)), -1)
        obs, _, _, _, info = envs.step(torch.multinomial(probs, 1).squeeze(-1).cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


def critic_step(args: Args, b: dict, critic, target, critic_opt) -> torch.Tensor:
    """One critic gradient step on a batch b of T-step slices (Algorithm 2 lines 12-14), with k
    actions from the stored categorical mu at s'; returns (loss, mean Q) as one tensor, on the device."""
    with torch.no_grad():
        next_q = target(b["next_obs"])  # [B, T, A]
        B, T, A = next_q.shape
        # Alg. 2 l.12: k actions a' ~ mu(.|s'). (+1e-12: slices past the newest step read unwritten zero
        # rows, whose targets "last" discards)
        sampled = torch.multinomial(b["next_mu"].reshape(B * T, A) + 1e-12, args.n_samples, replacement=True)
        bootstrap = backup_values(next_q.reshape(B * T, A).gather(-1, sampled).view(B, T, -1),
                                  args.backup, args.tau, args.backup_scale)
        y = td_lambda_targets(b["reward"], bootstrap, b["terminated"], b["last"], args.gamma, args.td_lambda)
    q = critic(b["obs"]).gather(-1, b["action"][:, :1]).squeeze(-1)
    loss = ((q - y) / critic.out_scale).pow(2).mean()  # Alg. 2 l.14
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return torch.stack([loss.detach(), q.detach().mean()])


# What train_critic and train_actor log, and an iteration whose updates have not begun: for each of
# the two, (steps taken, the mean of each metric over them).
CRITIC_METRICS, ACTOR_METRICS = ("critic_loss", "q_mean"), ("actor_loss",)
NOT_BEGUN = dict(critic=(0, (0.0,) * len(CRITIC_METRICS)), actor=(0, (0.0,) * len(ACTOR_METRICS)))


def train_critic(args: Args, buffer: FrameReplayBuffer, critic, target, critic_opt, step=critic_step,
                 done: tuple = NOT_BEGUN["critic"]) -> dict:
    """Algorithm 2 lines 6-15; `step` is critic_step or its compiled twin. done: the steps of this
    iteration already taken and their mean metrics (a stopped run going on). Returns the mean
    metrics of the iteration's steps and "critic_steps", the number taken."""
    sums, taken = torch.tensor(done[1], device=buffer.device) * done[0], done[0]
    for i in range(done[0], args.critic_steps):
        if Stop.signal:
            break
        if i % args.target_update_every == 0:  # Alg. 2 l.8-9
            target.load_state_dict(critic.state_dict())
        b = buffer.sample(args.batch_size, args.target_horizon)  # Alg. 2 l.11
        sums, taken = sums + step(args, b, critic, target, critic_opt), taken + 1
    return dict(zip(CRITIC_METRICS, (sums / max(1, taken)).tolist()), critic_steps=taken)


def actor_step(args: Args, b: dict, actor, critic, actor_opt) -> torch.Tensor:
    """One actor gradient step (Algorithm 2 lines 18-21), summed exactly over the actions
    (Section 4.1); returns the loss, on the device."""
    with torch.no_grad():
        q = critic(b["obs"])
    loss = exact_actor_loss(actor(b["obs"]), b["mu"][:, 0], q, args.beta, args.max_weight)
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    actor_opt.step()
    return loss.detach()


def train_actor(args: Args, buffer: FrameReplayBuffer, actor, critic, actor_opt, step=actor_step,
                done: tuple = NOT_BEGUN["actor"]) -> dict:
    """Algorithm 2 lines 16-22; `step` is actor_step or its compiled twin; done, and "actor_steps"
    returned, as in train_critic."""
    sums, taken = torch.tensor(done[1], device=buffer.device) * done[0], done[0]
    for _ in range(done[0], args.actor_steps):
        if Stop.signal:
            break
        b = buffer.sample(args.batch_size, 1)
        sums, taken = sums + step(args, b, actor, critic, actor_opt), taken + 1
    return dict(zip(ACTOR_METRICS, (sums / max(1, taken)).tolist()), actor_steps=taken)


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
        print(f"--compile: torch.compile does not work here ({type(e).__name__}: {first_line(e)[:100]}); "
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
# Around the loop: checkpoints, interruption
# ----------------------------------------------------------------------------

SCRIPT = "qwr_atari.py"
SAVED = ("actor", "critic", "actor_opt", "critic_opt")  # and the target, where saved
BUFFER_STATE = ("frames", "frame_count", "episode_first", "ptr", "size")
# Flags that can break the numbers: a non-finite loss names those set away from their defaults.
SENSITIVE = ("critic_lr", "actor_lr", "tau", "backup_scale", "beta", "max_weight", "gamma", "scale_value_targets")


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


def load_checkpoint(args: Args, state: dict, buffer: FrameReplayBuffer, device) -> tuple:
    """Load --checkpoint-path into the networks, optimisers and buffer; return its iterations done,
    run name, and the steps done of the next iteration where it stopped inside one (or None).
    A file that does not fit this run is refused with one line naming it and the mismatch."""
    path = args.checkpoint_path
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # not a file torch can read: say so, not a pickle stack trace
        raise UsageError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line(e)[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script", SCRIPT) != SCRIPT or not set(SAVED) <= set(ckpt):
        script = ckpt.get("script", "another script") if isinstance(ckpt, dict) else "not a dict"
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} ({script})")
    if ckpt["args"]["env_id"] != args.env_id:
        raise UsageError(f"{path} was trained on {ckpt['args']['env_id']}, not {args.env_id}")
    for k in ("actor",) if args.eval_only else SAVED:
        try:
            state[k].load_state_dict(ckpt[k])
        except (RuntimeError, ValueError, KeyError) as e:  # another torso, head or number of actions
            raise UsageError(f"{path}: its {k} does not fit this run's ({str(e).strip().splitlines()[-1][:160]})")
    steps_flags = ("critic_steps", "actor_steps", "target_update_every")
    if ckpt.get("partial") and not args.eval_only and any(ckpt["args"][k] != getattr(args, k) for k in steps_flags):
        wanted = " ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k in steps_flags)
        raise UsageError(f"{path} stopped inside an iteration's updates: resume it with {wanted}")
    if "target" in ckpt and not args.eval_only:  # the target of the moment (a stop between two copies)
        state["target"].load_state_dict(ckpt["target"])
    if not args.eval_only:
        if ckpt["buffer"]["data"]["frame"].shape != buffer.data["frame"].shape:
            raise UsageError(f"{path}: resume with the checkpoint's --buffer-size and --num-envs")
        buffer.data = ckpt["buffer"]["data"]
        for k, v in ckpt["buffer_state"].items():
            setattr(buffer, k, v)
        # The games restart, so the stored episode in progress ends here.
        buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True
        if "rng" in ckpt:  # the random streams go on where they stopped
            random.setstate(ckpt["rng"]["python"])
            np_state = ckpt["rng"]["numpy"]
            np.random.set_state((np_state[0], np.array(np_state[1], np.uint32), *np_state[2:]))
            torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["iteration"], ckpt.get("run_name"), ckpt.get("partial")


def save_checkpoint(path: str, args: Args, state: dict, buffer: FrameReplayBuffer, iteration: int,
                    run_name: str, partial: Optional[dict] = None) -> None:
    """iteration: the iterations done; partial: the critic and actor steps done of the next one (with
    their mean losses, its seconds and episodes so far), when a stop came inside its updates."""
    np_state = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
               torch=torch.get_rng_state())
    torch.save({k: state[k].state_dict() for k in SAVED} | dict(
        script=SCRIPT, args=asdict(args), iteration=iteration, partial=partial, run_name=run_name, rng=rng,
        target=state["target"].state_dict(),
        buffer={"data": buffer.data}, buffer_state={k: getattr(buffer, k) for k in BUFFER_STATE}), path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed mid-write leaves the last good checkpoint


def exit_interrupted(args: Args, state: dict, buffer: FrameReplayBuffer, iteration: int, run_name: str,
                     partial: Optional[dict] = None) -> None:
    """After Stop.signal: save the run as it stands (iterations done, and the steps done of the next
    one) and exit with the command that resumes it."""
    path = os.path.abspath(f"runs/{run_name}/{args.exp_name}.pt")
    save_checkpoint(path, args, state, buffer, iteration, run_name, partial)
    where = (f"in iteration {iteration + 1}, after {partial['critic'][0]} of {args.critic_steps} critic and "
             f"{partial['actor'][0]} of {args.actor_steps} actor steps" if partial else f"after iteration {iteration}")
    print(f"stopped by {signal.Signals(Stop.signal).name} {where}, saved; resume with: {resume_command(args, path)}",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + Stop.signal)


def resume_command(args: Args, path: str) -> str:
    """The command line that continues this run from the checkpoint at path."""
    defaults = asdict(Args())
    flags = [(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
             else f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items()
             if v != defaults[k] and k != "checkpoint_path"]
    return shlex.join(["python", SCRIPT, *flags, f"--checkpoint-path={path}"])


def train(args: Args) -> dict:
    """Runs QWR on an Atari game and returns the final metrics."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"

    envs = make_vec_env(args.env_id, args.num_envs, args.train_episode_steps, args.noop_max)
    n_actions = envs.single_action_space.n
    # Alg. 2 l.1-3: random actor and critic, an empty replay buffer.
    actor = Actor(n_actions, args.torso).to(device)
    critic = QNetwork(n_actions, args.torso, 1 / (1 - args.gamma) if args.scale_value_targets else 1.0,
                      args.critic_head).to(device)
    target = copy.deepcopy(critic).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    buffer = FrameReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, n_actions, device)
    state = dict(actor=actor, critic=critic, target=target, actor_opt=actor_opt, critic_opt=critic_opt)

    start, partial = 0, None
    if args.checkpoint_path:  # the same run goes on: its log directory, step counter and random state
        start, saved_name, partial = load_checkpoint(args, state, buffer, device)
        run_name = saved_name or run_name
    if args.eval_only:
        returns = evaluate(args, actor, device, args.seed + 10_000,
                           f"videos/{run_name}" if args.capture_video else None)
        print(f"eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes")
        return {"eval_return": float(returns.mean()), "eval_returns": returns.tolist()}

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    n_iterations = args.total_timesteps // args.steps_per_iteration
    critic_update, actor_update = compiled(critic_step, args, device), compiled(actor_step, args, device)
    print(f"QWR-{args.backup} on {args.env_id} ({device}), {n_iterations} iterations, logs in runs/{run_name}")
    # A resumed run restarts its games; a new seed keeps them from repeating the first iteration's.
    obs, _ = envs.reset(seed=args.seed + start)
    buffer.push_frames(obs[:, -1], np.arange(args.num_envs), new_episode=True)
    # (a run stopped inside an iteration counts that iteration's seconds before the stop)
    start_time, start_step = time.time() - (partial or {}).get("seconds", 0.0), start * args.steps_per_iteration
    metrics: dict = {}
    for iteration in range(start, n_iterations):  # Alg. 2 l.4
        global_step = (iteration + 1) * args.steps_per_iteration
        # A run stopped inside this iteration's updates has played its steps: it takes the remaining updates.
        done = partial if iteration == start and partial else NOT_BEGUN
        iteration_start = time.time() - done.get("seconds", 0.0)
        episodes = done.get("episodes", [])  # a stopped run's, logged by it
        if done is NOT_BEGUN:
            # Alg. 2 l.5: play with the current policy, storing each step's mu.
            obs, episodes = collect(envs, obs, args.steps_per_iteration // args.num_envs, actor, buffer, device)
            for ret, length in episodes:
                writer.add_scalar("charts/episodic_return", ret, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
        metrics = train_critic(args, buffer, critic, target, critic_opt, critic_update, done["critic"])  # l.6-15
        metrics |= train_actor(args, buffer, actor, critic, actor_opt, actor_update, done["actor"])  # l.16-22
        if not all(math.isfinite(metrics[k]) for k in ("critic_loss", "actor_loss", "q_mean")):
            changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SENSITIVE
                       if getattr(args, k) != getattr(Args(), k)]
            raise FloatingPointError(f"non-finite losses at step {global_step} (critic {metrics['critic_loss']}, "
                                     f"actor {metrics['actor_loss']}); likely cause: "
                                     f"{', '.join(changed) or 'none of the flags'}")
        if Stop.signal and (metrics["critic_steps"] < args.critic_steps or metrics["actor_steps"] < args.actor_steps):
            # Stopped inside the updates: save the steps taken, their mean losses, the iteration's seconds and
            # episodes so far; the resumed run takes the rest and logs the iteration as a whole.
            exit_interrupted(args, state, buffer, iteration, run_name, dict(
                critic=(metrics["critic_steps"], [metrics[k] for k in CRITIC_METRICS]),
                actor=(metrics["actor_steps"], [metrics[k] for k in ACTOR_METRICS]),
                episodes=episodes, seconds=time.time() - iteration_start))

        sps = int((global_step - start_step) / (time.time() - start_time))
        metrics |= dict(global_step=global_step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
        for k in ("critic_loss", "actor_loss", "q_mean"):
            writer.add_scalar(f"losses/{k}", metrics[k], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        line = f"iter {iteration + 1}/{n_iterations} step {global_step}"
        if episodes:
            line += f" | train return {metrics['episodic_return']:.1f}"
        if ((iteration + 1) % args.eval_every == 0 or iteration + 1 == n_iterations) and args.eval_episodes > 0:
            video = f"videos/{run_name}/step{global_step}" if args.capture_video else None
            metrics["eval_return"] = float(evaluate(args, actor, device, args.seed + 10_000, video).mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], global_step)
            line += f" | eval return {metrics['eval_return']:.1f}"
            if args.save_model:
                metrics["checkpoint"] = f"runs/{run_name}/{args.exp_name}.pt"
                save_checkpoint(metrics["checkpoint"], args, state, buffer, iteration + 1, run_name)
        print(line + f" | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f}"
              f" | {sps} SPS, {metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
        if Stop.signal:  # after the iteration's updates: save the run as it stands
            exit_interrupted(args, state, buffer, iteration + 1, run_name)

    envs.close()
    writer.close()
    print(f"done: eval return {metrics.get('eval_return', float('nan')):.1f} at step {n_iterations * args.steps_per_iteration}, "
          f"{(time.time() - start_time) / 60:.1f} min" if metrics else
          f"nothing left to train: the checkpoint is at iteration {start} of {n_iterations}")
    return metrics | {"run_name": run_name}


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    Stop.catch_signals()
    try:
        train(cli_args)
    except UsageError as e:
        sys.exit(f"error: {e}")
