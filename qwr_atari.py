"""Q-Value Weighted Regression (QWR) on Atari, the 100K-interaction protocol.

QWR (Kozakowski et al., ../shared/papers/qwr.md, Algorithm 2; Section 4 and Table 2) with the
hyper-parameters of its MuJoCo runs (Table 4) and the convolutional networks of Mnih et al.
(2013). With discrete actions:
  - the sampling policy mu stored with each step is the categorical distribution that acted
    (its probabilities over all actions);
  - critic targets are T = 3-step TD(lambda) targets whose bootstrap F (mean, max or
    log-sum-exp, Eq. 6) aggregates Q over k = 4 actions sampled from the stored mu at the next
    state, as in the continuous case;
  - the actor loss sums exactly over all actions instead of sampling (Section 4.1):
    -sum_a mu(a|s) w(s, a) log pi(a|s), w = min(exp(A / beta), 20).
Preprocessing is Appendix 6.1's: 4 frames per action with the max of the last 2, grey 84x84,
4 stacked frames, 0-30 no-ops, rewards clipped to [-1, 1] for training only, episodes of up to
10K interactions. Frames are stored once, not once per stack. Where the paper is silent, the
authors' Trax code (its Atari config) decides: gradient norms clipped at 0.5, the critic's last
layer started at U(+-1e-6), evaluation greedy (it also logs the sampled policy's returns).

    python qwr_atari.py --env-id BreakoutNoFrameskip-v4
"""

import copy
import math
import os
import random
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # name of this experiment (part of the run directory)
    seed: int = 1  # seed of python, numpy, torch and the games
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = True  # use CUDA when it is available (the replay buffer and all updates live there)
    compile: bool = False  # torch.compile the two gradient steps (faster; on a CPU it needs a C++ compiler)
    env_id: str = "BreakoutNoFrameskip-v4"  # <Game>NoFrameskip-v4, or ALE/<Game>-v5 (made without frame skip)
    total_timesteps: int = 100_000  # agent interactions in total (Atari 100K; one interaction = 4 frames)
    num_envs: int = 1  # parallel games that share the per-iteration interaction budget
    # Algorithm 2's schedule (Table 4, as on MuJoCo)
    steps_per_iteration: int = 1000  # interactions collected per iteration
    critic_steps: int = 1000  # critic gradient steps per iteration
    actor_steps: int = 1000  # actor gradient steps per iteration
    target_update_every: int = 100  # critic steps between copies of the critic into the target
    batch_size: int = 256  # states per gradient step
    buffer_size: int = 50_000  # replay buffer capacity in interactions
    critic_lr: float = 5e-4  # Adam learning rate of the critic
    actor_lr: float = 1e-4  # Adam learning rate of the actor
    max_grad_norm: float = 0.5  # clip each network's gradient norm at this (authors' Atari config); 0: off
    # Critic targets
    backup: Literal["lse", "max", "mean"] = "lse"  # backup F over the k sampled actions: QWR-LSE, -MAX or -AVG
    tau: float = 0.3  # log-sum-exp temperature (the 100K setting)
    backup_scale: Literal["mad", "std", "none"] = "mad"  # s(X) of Eq. 6 over the batch: mean abs. deviation, std, 1
    n_samples: int = 4  # k, actions sampled from the stored mu of each next state for the backup
    target_horizon: int = 3  # T, the horizon of the multi-step targets
    td_lambda: float = 0.95  # lambda of the truncated TD(lambda) mix of the 1..T-step targets
    gamma: float = 0.99  # discount factor
    critic_head_init: float = 1e-6  # Q's last layer starts at U(+-this) (authors' Atari config); 0: PyTorch's init
    # Actor and networks
    beta: float = 1.0  # temperature of the advantage weights exp(A / beta)
    max_weight: float = 20.0  # advantage weights are clipped at this value
    torso: Literal["mnih2013", "nature"] = "mnih2013"  # Mnih et al. 2013 (the paper's text), or the Nature DQN one
    # Atari protocol (Appendix 6.1)
    max_episode_steps: int = 10_000  # interactions per episode, training and evaluation, before it is truncated
    noop_max: int = 30  # up to this many no-op actions at the start of each episode
    # Evaluation, logging, checkpoints
    eval_every: int = 10  # evaluate every this many iterations (and at the end)
    eval_episodes: int = 10  # episodes per evaluation, greedy and sampled, with raw (unclipped) rewards
    capture_video: bool = False  # record the first episode of each evaluation to videos/
    save_model: bool = False  # write a checkpoint (networks, optimisers, replay buffer) after every iteration
    checkpoint_path: Optional[str] = None  # checkpoint to resume from, in its run directory


# The math: backups, TD(lambda) targets, the exact discrete actor loss


def backup_values(q: torch.Tensor, kind: str, tau: float, scale: str) -> torch.Tensor:
    """Backup F (Section 2.3, Eq. 6) over the k sampled Q-values in q[..., k]: "mean", "max", or "lse" =
    s tau (logsumexp(X / (s tau)) - log k) with ONE scale s over every Q-value of the batch, as the
    authors' code does: mean absolute deviation, standard deviation or 1. s = 0 gives the mean."""
    if kind == "mean":
        return q.mean(-1)
    if kind == "max":
        return q.amax(-1)
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
    """Truncated TD(lambda) target of the first step of T-step slices (Appendix 6.4), inputs [..., T]
    along a stored trajectory. Weights (1 - lam) lam^(n-1) on the n-step targets, the remainder
    lam^(T-1) on the T-step one; a termination stops bootstrapping, a truncation bootstraps from the
    final observation, and a slice stops at an episode end or the newest step (last)."""
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def exact_actor_loss(logits: torch.Tensor, mu: torch.Tensor, q: torch.Tensor, beta: float,
                     max_weight: float) -> torch.Tensor:
    """Eq. 3 summed over all actions: -mean_s sum_a mu(a|s) w(s, a) log pi(a|s). A(s, a) = Q(s, a) -
    sum_a' mu(a'|s) Q(s, a') (V_mu exactly), normalised over every (state, action) of the batch,
    w = min(exp(A / beta), max_weight)."""
    adv = q - (mu * q).sum(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    weights = torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))
    return -(mu * weights * torch.log_softmax(logits, -1)).sum(-1).mean()


# Environment, replay buffer of single frames, networks


def make_env(args: Args, video_folder: Optional[str] = None):
    def thunk():
        import ale_py

        gym.register_envs(ale_py)
        # ALE/<Game>-v5 skips frames and repeats actions by default; the protocol wants neither.
        kwargs = dict(frameskip=1, repeat_action_probability=0.0) if args.env_id.startswith("ALE/") else {}
        env = gym.make(args.env_id, render_mode="rgb_array" if video_folder else None, **kwargs)
        if video_folder:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
        env = gym.wrappers.TimeLimit(env, args.max_episode_steps)  # counted in interactions (4 frames each)
        return gym.wrappers.FrameStackObservation(env, 4)  # padded with the reset frame

    return thunk


def make_vec_env(args: Args, n: int, video_folder: Optional[str] = None):
    # SAME_STEP autoreset: every step is a real transition; at an episode end the true last observation
    # is in info["final_obs"] and the returned one starts the next episode.
    envs = gym.vector.SyncVectorEnv([make_env(args, video_folder if i == 0 else None) for i in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)  # raw returns: clipping happens in the buffer


class FrameReplayBuffer:
    """Transitions [capacity, num_envs] that point into each env's stream of single 84x84 uint8 frames:
    every interaction appends the newest frame of its next observation, an episode's start its reset
    frame. The stacked observation at a step is its frame and the 3 before it, clamped to the episode's
    first frame (FrameStackObservation's reset padding); the next observation is one frame further, the
    true final one at an episode end. A 50K buffer so holds at most 2 x 50K frames (700 MB) instead of
    2 x 4 x 50K. Each step also stores the categorical sampling policy mu that acted (its probabilities)
    at s, and at s' for the backup."""

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
        """Slices of `horizon` consecutive steps [B, T, ...]; "last" marks where a slice must stop (an
        episode end, or the newest stored step)."""
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
    """Mnih et al. (2013): 16 8x8/4, 32 4x4/2, 256 units; or the Nature DQN torso (the authors' code)."""
    if kind == "mnih2013":
        layers = [nn.Conv2d(4, 16, 8, 4), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten(),
                  nn.Linear(32 * 9 * 9, 256), nn.ReLU()]
        return nn.Sequential(*layers), 256
    layers = [nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(), nn.Conv2d(64, 64, 3, 1),
              nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU()]
    return nn.Sequential(*layers), 512


class QNetwork(nn.Module):
    """Q(s, .) for every action with the paper's action embedding (Section 4): o * tanh(W a + b) with a
    one-hot, i.e. one learned gate vector per action, then the authors' value head (o projected before
    the gate; LayerNorm, 256 ReLU units, linear; output scaled by 1 / (1 - gamma), see qwr_continuous.py)."""

    def __init__(self, n_actions: int, args: Args):
        super().__init__()
        self.torso, hidden = torso(args.torso)
        self.embed = nn.Linear(n_actions, hidden)
        self.torso.append(nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 256), nn.ReLU(), nn.Linear(256, 1))
        if args.critic_head_init > 0:  # the authors' tiny head: Q starts at ~0 for every action
            nn.init.uniform_(self.head[-1].weight, -args.critic_head_init, args.critic_head_init)
            nn.init.zeros_(self.head[-1].bias)
        self.out_scale = 1 / (1 - args.gamma)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [..., 4, 84, 84] uint8 -> Q [..., n_actions]."""
        o = self.torso(frames.reshape((-1,) + frames.shape[-3:]).float() / 255.0)
        gates = torch.tanh(self.embed.weight.T + self.embed.bias)  # [n_actions, hidden]: W e_a + b
        q = self.head(o[:, None, :] * gates).squeeze(-1) * self.out_scale
        return q.reshape(frames.shape[:-3] + (-1,))


class Actor(nn.Module):
    """Logits of the categorical policy; a near-zero head, so the first policy is near uniform."""

    def __init__(self, n_actions: int, kind: str):
        super().__init__()
        self.torso, hidden = torso(kind)
        self.head = nn.Linear(hidden, n_actions)
        nn.init.uniform_(self.head.weight, -0.01, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        o = self.torso(frames.reshape((-1,) + frames.shape[-3:]).float() / 255.0)
        return self.head(o).reshape(frames.shape[:-3] + (-1,))


# Acting: collection and evaluation


@torch.no_grad()
def collect(envs, obs: np.ndarray, steps_per_env: int, actor, buffer: FrameReplayBuffer, device) -> tuple:
    """Algorithm 2 line 5: act for steps_per_env vector steps, writing frames and transitions, each with
    the mu that acted at s and the policy at s', into the buffer. Returns the observation to go on from
    and the (return, length) of each episode that ended."""
    episodes, all_envs = [], np.arange(envs.num_envs)
    probs = torch.softmax(actor(torch.as_tensor(obs, device=device)), -1)
    for _ in range(steps_per_env):
        action = torch.multinomial(probs, 1).squeeze(-1)
        next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        ended = terminated | truncated
        true_next = next_obs.copy()
        for i in np.flatnonzero(ended):
            true_next[i] = info["final_obs"][i]
            episodes.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        frame, first = buffer.frame_count - 1, buffer.episode_first.copy()
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
def evaluate(args: Args, actor, device, greedy: bool, video_folder: Optional[str] = None) -> np.ndarray:
    """Raw returns of eval_episodes episodes of the greedy policy (its most likely action; temperature
    0, as the authors' code evaluated), or of the sampled one."""
    envs = make_vec_env(args, args.eval_episodes, video_folder)
    obs, _ = envs.reset(seed=args.seed + 10_000)
    noise = torch.Generator(device).manual_seed(args.seed + 10_000)  # its own stream: training's is left alone
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        logits = actor(torch.as_tensor(obs, device=device))
        action = logits.argmax(-1) if greedy else torch.multinomial(torch.softmax(logits, -1), 1, generator=noise)
        obs, _, _, _, info = envs.step(action.reshape(-1).cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# The two gradient steps of an iteration (Algorithm 2 lines 11-14 and 17-21)


def critic_step(args: Args, b: dict, critic, target, critic_opt) -> torch.Tensor:
    """One critic gradient step on a batch b of T-step slices, with k actions from the stored categorical
    mu at s'; returns (loss, mean Q) as one tensor, on the device."""
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
    loss = ((q - y) / critic.out_scale).pow(2).mean()  # Alg. 2 l.14, in the network's own units
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
    critic_opt.step()
    return torch.stack([loss.detach(), q.detach().mean()])


def actor_step(args: Args, b: dict, actor, critic, actor_opt) -> torch.Tensor:
    """One actor gradient step (Algorithm 2 lines 18-21), summed exactly over the actions (Section
    4.1) with the stored mu at s and the critic at s; returns the loss, on the device."""
    with torch.no_grad():
        q = critic(b["obs"])
    loss = exact_actor_loss(actor(b["obs"]), b["mu"][:, 0], q, args.beta, args.max_weight)
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_opt.step()
    return loss.detach()[None]


def train(args: Args) -> dict:
    """QWR on an Atari game (Algorithm 2); returns the final metrics."""
    n_actions = check_env(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    envs = make_vec_env(args, args.num_envs)
    # Alg. 2 l.1-3: random actor and critic, an empty replay buffer.
    actor = Actor(n_actions, args.torso).to(device)
    critic = QNetwork(n_actions, args).to(device)
    target = copy.deepcopy(critic).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5)  # (the authors' Adam eps)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    buffer = FrameReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, n_actions, device)
    saved = dict(actor=actor, critic=critic, target=target, actor_opt=actor_opt, critic_opt=critic_opt)
    start, run_name = 0, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
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
    buffer.push_frames(obs[:, -1], np.arange(args.num_envs), new_episode=True)
    metrics, start_time = {}, time.time()
    for iteration in range(start, n_iterations):  # Alg. 2 l.4
        iteration_start, step = time.time(), (iteration + 1) * args.steps_per_iteration
        # Alg. 2 l.5: play with the current policy, storing each step's mu.
        obs, episodes = collect(envs, obs, args.steps_per_iteration // args.num_envs, actor, buffer, device)
        for ret, length in episodes:
            writer.add_scalar("charts/episodic_return", ret, step)
            writer.add_scalar("charts/episodic_length", length, step)
        critic_sums = torch.zeros(2, device=device)
        for i in range(args.critic_steps):  # Alg. 2 l.6-15
            if i % args.target_update_every == 0:  # Alg. 2 l.8-9: the target network is the critic of now
                target.load_state_dict(critic.state_dict())
            critic_sums += critic_update(args, buffer.sample(args.batch_size, args.target_horizon), critic, target,
                                         critic_opt)
        actor_sums = torch.zeros(1, device=device)
        for _ in range(args.actor_steps):  # Alg. 2 l.16-22
            actor_sums += actor_update(args, buffer.sample(args.batch_size, 1), actor, critic, actor_opt)
        metrics = dict(zip(("critic_loss", "q_mean", "actor_loss"), torch.cat(
            [critic_sums / max(1, args.critic_steps), actor_sums / max(1, args.actor_steps)]).tolist()))
        if not math.isfinite(metrics["critic_loss"] + metrics["actor_loss"]):
            raise FloatingPointError(f"non-finite losses at step {step}: {metrics}")

        sps = int((step - start * args.steps_per_iteration) / (time.time() - start_time))
        metrics |= dict(global_step=step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        for k in ("critic_loss", "actor_loss", "q_mean"):
            writer.add_scalar(f"losses/{k}", metrics[k], step)
        writer.add_scalar("charts/SPS", sps, step)
        line = f"iter {iteration + 1}/{n_iterations} step {step}"
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
            line += f" | train return {metrics['episodic_return']:.1f}"
        if ((iteration + 1) % args.eval_every == 0 or iteration + 1 == n_iterations) and args.eval_episodes > 0:
            video = f"videos/{run_name}/step{step}" if args.capture_video else None
            metrics["eval_return"] = float(evaluate(args, actor, device, True, video).mean())
            metrics["eval_return_sampled"] = float(evaluate(args, actor, device, False).mean())
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


BUFFER_STATE = ("data", "frames", "frame_count", "episode_first", "ptr", "size")


def save_checkpoint(path: str, saved: dict, buffer: FrameReplayBuffer, **info) -> str:
    """Networks, optimisers and the replay buffer, written atomically: a run killed while writing
    leaves the previous checkpoint whole."""
    state = {k: v.state_dict() for k, v in saved.items()} | {"buffer": {k: getattr(buffer, k) for k in BUFFER_STATE}}
    torch.save(state | info, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(path: str, saved: dict, buffer: FrameReplayBuffer, device) -> tuple[int, str]:
    """Load a checkpoint of save_checkpoint; returns its iterations done and run name."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for k, module in saved.items():
        module.load_state_dict(ckpt[k])
    for k, v in ckpt["buffer"].items():
        setattr(buffer, k, v)
    buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True  # the games restart: no crossing
    return ckpt["iteration"], ckpt["run_name"]


def check_env(args: Args) -> int:
    """The game's number of actions, or one line saying why this script cannot learn on the env."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make env {args.env_id!r}: {e}")
    act, is_atari = env.action_space, hasattr(env.unwrapped, "ale")
    env.close()
    if not isinstance(act, gym.spaces.Discrete) or not is_atari:
        raise SystemExit(f"error: qwr_atari.py needs an Atari (ALE) game, and {args.env_id} is not one "
                         "(for MuJoCo, use qwr_continuous.py)")
    if args.total_timesteps % args.steps_per_iteration or args.steps_per_iteration % args.num_envs:
        raise SystemExit("error: --total-timesteps must be a multiple of --steps-per-iteration, "
                         "and that of --num-envs")
    return act.n


if __name__ == "__main__":
    train(tyro.cli(Args))
