"""Q-Value Weighted Regression (QWR) for continuous control (MuJoCo).

QWR (Kozakowski et al., ../shared/papers/qwr.md, Algorithm 2) is AWR with a
Q-value critic. Each iteration it
  1. collects 1000 env steps with a Gaussian policy of fixed std 0.4 and stores,
     with every step, the sampling policy mu(.|s) that chose the action;
  2. trains the critic Q(s, a) on multi-step TD(lambda) targets (Appendix 6.4,
     Eqs. 12-13) whose bootstrap F aggregates Q over k actions sampled from the
     stored mu: mean, max or log-sum-exp (Section 2.3, Eq. 6);
  3. trains the actor by advantage-weighted regression over k actions sampled
     from the stored mu (Eq. 3): weights exp(A / beta), A = Q(s, a_j) - mean_j Q.
Defaults are the paper's Table 4 and the 100K setting of Appendix 6.1. Details
the paper leaves open follow the authors' Trax code (class SamplingAWR), and
each is a flag that says so. `train` is the online algorithm; `train_offline`
(Section 4.4) runs the same two updates on a Minari dataset, with
mu = N(action taken, 0.4). The online mode can write such datasets.

    python qwr_continuous.py --env-id Walker2d-v4
    python qwr_continuous.py --offline-dataset-id local/walker2d/qwr-replay-v0
"""

import copy
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
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
    """torch.compile the critic and actor gradient steps (eager where this machine cannot compile)"""
    cudagraphs: bool = True
    """with --compile on CUDA: replay each gradient step from CUDA graphs (compile's "reduce-overhead" mode)"""
    bf16_matmuls: bool = False
    """hidden layers multiply in bfloat16 with float32 sums, close to the authors' TPU v2 (see Linear):
    1.1-1.5x faster iterations than eager float32 on a CPU with avx512_bf16 (GPU not measured); off: float32"""
    env_id: Optional[str] = None
    """gymnasium id of an environment with a continuous (Box) action space: Walker2d-v4 if not given;
    offline, the dataset's (a given id must be the same)"""

    # Online training (Algorithm 2's schedule, Table 4)
    total_timesteps: int = 100_000
    """environment steps in total (the paper's 100K budget, Table 1)"""
    steps_per_iteration: int = 1000
    """environment steps collected per iteration (Table 4, n_iterations row)"""
    num_envs: int = 1
    """parallel environments that share the per-iteration step budget"""
    buffer_size: int = 50_000
    """replay buffer capacity in environment steps"""
    obs_norm_sample_limit: int = 300_000
    """observations after which the running mean/std normaliser freezes (authors' code); 0 turns it off"""
    obs_clip: float = 0.0
    """clip normalised observations to +-this (e.g. 10, for Humanoid's contact forces); 0: no clip (authors' code)"""

    # The two updates of every iteration (Table 4), online and offline
    critic_steps: int = 1000
    """critic gradient steps per iteration (n_critic_steps)"""
    actor_steps: int = 1000
    """actor gradient steps per iteration (n_actor_steps)"""
    target_update_every: int = 100
    """critic steps between copies of the critic into the target (update_frequency)"""
    batch_size: int = 256
    """states per gradient step, for actor and critic"""
    critic_lr: float = 5e-4
    """Adam learning rate of the critic (alpha_V)"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor (alpha_pi)"""

    # Critic targets (Section 2.3, Appendix 6.1 and 6.4)
    backup: Literal["lse", "max", "mean"] = "lse"
    """backup F over the k sampled actions: log-sum-exp (QWR-LSE), max or mean (QWR-AVG)"""
    tau: float = 0.3
    """log-sum-exp temperature (0.3 at 100K steps, 1.0 at 1M; Appendix 6.1)"""
    backup_scale: Literal["mad", "std", "none"] = "mad"
    """scale s(X) of Eq. 6: mean absolute deviation (100K), standard deviation (1M), or 1"""
    n_samples: int = 4
    """k, actions sampled from the stored mu per state, for backup and actor"""
    target_horizon: int = 3
    """T, the longest of the multi-step targets (Table 4's "margin")"""
    td_lambda: float = 0.95
    """lambda of the truncated TD(lambda) mix of the 1..T-step targets (Eq. 13)"""
    gamma: float = 0.99
    """discount factor"""
    critic_head: Literal["mlp", "linear"] = "mlp"
    """value head after the action gate: LayerNorm + 256 ReLU + linear (authors' code), or linear"""
    scale_value_targets: bool = True
    """critic outputs Q * (1 - gamma) (per-step units), as the authors' code does"""
    critic_clips_actions: bool = False
    """Q gets the action clipped to the bounds, as executed; off: the sampled action itself (authors' code)"""

    # Actor (Eq. 3)
    beta: float = 1.0
    """temperature of the advantage weights exp(A / beta)"""
    max_weight: float = 20.0
    """advantage weights are clipped at this value"""
    action_std: float = 0.4
    """fixed standard deviation of the Gaussian policy"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate the policy, deterministic and sampled, every this many iterations (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    capture_video: bool = False
    """record the first episode of each evaluation to videos/"""
    save_model: bool = False
    """write a checkpoint (networks, optimisers, replay buffer, random state) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, in the same run directory, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""

    # Offline mode (Section 4.4) and datasets (Minari, https://minari.farama.org; $MINARI_DATASETS_PATH)
    offline_dataset_id: Optional[str] = None
    """train from this Minari dataset without env interaction, mu = N(action taken, --action-std)"""
    offline_iterations: int = 30
    """iterations of critic and actor steps in offline mode (Section 4.4)"""
    download: bool = True
    """download --offline-dataset-id with Minari when it is not in the local store"""
    save_dataset: Optional[str] = None
    """Minari id (e.g. local/walker2d/qwr-replay-v0): at the end, write every step collected as a dataset"""
    save_policy_dataset: Optional[str] = None
    """Minari id: at the end, write --policy-dataset-episodes episodes of the trained (stochastic) policy"""
    policy_dataset_episodes: int = 50
    """episodes in the --save-policy-dataset dataset (the paper's offline datasets have 50, Fig. 3)"""


SCRIPT = "qwr_continuous.py"
DEFAULT_ENV_ID = "Walker2d-v4"
# Flags that mean something in one mode only: set in the other, they are an error, not silently ignored.
ONLINE_ONLY = ("total_timesteps", "steps_per_iteration", "num_envs", "buffer_size", "obs_norm_sample_limit",
               "save_dataset")
OFFLINE_ONLY = ("offline_iterations", "download")
# Flags that can break the numbers: a non-finite loss names those set away from their defaults.
SENSITIVE = ("critic_lr", "actor_lr", "tau", "backup_scale", "beta", "max_weight", "action_std", "gamma",
             "scale_value_targets")


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


# ----------------------------------------------------------------------------
# The math of QWR, as pure functions (tests/ check them against hand values)
# ----------------------------------------------------------------------------


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


def sample_actions(mu_mean: torch.Tensor, mu_std: torch.Tensor, k: int) -> torch.Tensor:
    """k actions from each stored Gaussian mu = N(mean, std): [..., act_dim] -> [..., k, act_dim]
    (Algorithm 2 lines 12 and 18). Unclipped: mu's density is defined for them."""
    noise = torch.randn(mu_mean.shape[:-1] + (k,) + mu_mean.shape[-1:], device=mu_mean.device)
    return mu_mean.unsqueeze(-2) + mu_std.unsqueeze(-2) * noise


def backup_values(q: torch.Tensor, kind: str, tau: float, scale: str) -> torch.Tensor:
    """Backup F (Section 2.3, Eq. 6) over the k sampled Q-values in q[..., k].

    "mean" estimates E_mu Q (QWR-AVG), "max" the greedy value, "lse" is
        F(X) = s tau (logsumexp(X / (s tau)) - log k),
    between the two: tau -> 0 gives max, tau -> inf gives mean. As in the
    authors' code, s is ONE scalar over every Q-value in q (all states, steps
    and samples of the batch): the mean absolute deviation ("mad"), the standard
    deviation ("std") or 1 ("none"). s = 0 means all values are equal; then the
    result is their mean, never NaN (the authors add 1e-5 to s instead).
    """
    if kind == "mean":
        return q.mean(-1)
    if kind == "max":
        return q.amax(-1)
    if kind != "lse":
        raise ValueError(f"unknown backup {kind!r}")
    if scale == "mad":
        s = (q - q.mean()).abs().mean()
    elif scale == "std":
        s = q.std(correction=0)
    elif scale == "none":
        s = torch.ones((), dtype=q.dtype, device=q.device)
    else:
        raise ValueError(f"unknown backup scale {scale!r}")
    temp = s * tau
    # Divide by 1 where temp = 0, so that neither the value nor its gradient is NaN.
    safe_temp = torch.where(temp > 0, temp, torch.ones_like(temp))
    # temp * log mean exp(q / temp), written as top + temp * log1p(mean(expm1((q - top) / temp))) with
    # top = max q: exp() cannot overflow, and at a high temperature (F near the mean) no precision is
    # lost to log(k) - log(k), which in float32 is off by ~1e-7 * temp.
    top = q.amax(-1, keepdim=True)
    lse = top.squeeze(-1) + safe_temp * torch.log1p(torch.expm1((q - top) / safe_temp).mean(-1))
    return torch.where(temp > 0, lse, q.mean(-1))


def td_lambda_targets(
    rewards: torch.Tensor,
    bootstrap: torch.Tensor,
    terminated: torch.Tensor,
    last: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices (App. 6.4).

    All inputs are [..., T] along a stored trajectory: rewards r_t, bootstrap
    F_t = F(Q(s_{t+1}, .)) at the next state, terminated_t, and last_t (the
    episode ends at t, or t is the newest step stored). With Q_n the n-step
    target of Eq. 12, the result is
        (1 - lam) Q_1 + lam (1 - lam) Q_2 + ... + lam^(T-1) Q_T,
    weights summing to 1 (Eq. 13 with the remainder on the last term, as the
    authors' code does). It is computed by the recursion
        G_t = r_t + gamma * (1 - terminated_t) * ((1 - lam) F_t + lam G_{t+1}),
    where G_{t+1} is replaced by F_t at t = T-1 and after an episode end, so
    a target never crosses into the next episode: after a termination the
    longer targets stop bootstrapping, after a time-limit truncation they
    bootstrap from the final observation.
    """
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:  # a longer target follows, unless the slice stops at t
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def advantage_weights(q: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Actor weights of Eq. 3 / Algorithm 2 lines 19-20 for q[B, k] = Q(s, a_j).

    A = Q(s, a_j) - mean_j Q(s, a_j) (V estimated with the mean over the k
    samples whatever the critic's backup), normalised over the whole batch
    (mean and std, Appendix 6.1), then w = min(exp(A / beta), max_weight),
    computed without overflow.
    """
    adv = q - q.mean(-1, keepdim=True)
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))



# ----------------------------------------------------------------------------
# Environment, replay buffer, observation normaliser, networks
# ----------------------------------------------------------------------------


def make_env(env_id, video_folder: Optional[str] = None) -> gym.Env:
    """env_id: an id, or an offline dataset's EnvSpec. A Dict observation (antmaze, kitchen) is
    flattened in its space's order, the order in which flat_obs flattens a dataset's."""
    env = gym.make(env_id, render_mode="rgb_array") if video_folder else gym.make(env_id)
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    if not video_folder:
        return env
    return gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)


def make_vec_env(env_id, n: int, video_folder: Optional[str] = None) -> gym.vector.VectorEnv:
    # SAME_STEP autoreset: every step is a real transition; when an episode ends,
    # the returned observation already starts the next one and the true last
    # observation is in info["final_obs"].
    envs = gym.vector.SyncVectorEnv(
        [lambda i=i: make_env(env_id, video_folder if i == 0 else None) for i in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)  # info["episode"] at episode ends
    # The policy's Gaussian samples can leave the action bounds; the environment executes them clipped (the
    # authors' code passed them on to its own environments, which are not public; here the bounds are the env's).
    return gym.wrappers.vector.ClipAction(envs)


def check_env(env_id) -> gym.Env:
    """The env's spaces, or a UsageError saying why this script cannot learn on it."""
    try:
        env = make_env(env_id)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {env_id!r}: {e}") from None
    except ModuleNotFoundError as e:  # e.g. gymnasium_robotics, for kitchen, antmaze and Adroit datasets
        package = (e.name or "?").split(".")[0].replace("_", "-")
        raise UsageError(f"{getattr(env_id, 'id', env_id)} needs {package}: pip install {package}") from None
    env_id = getattr(env_id, "id", env_id)
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box):
        raise UsageError(f"qwr_continuous.py needs a continuous (Box) action space, but {env_id} has {act}")
    if not np.all(np.isfinite(act.low)) or not np.all(np.isfinite(act.high)):
        raise UsageError(f"{env_id}'s action space has infinite bounds: {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise UsageError(f"qwr_continuous.py needs flat vector observations, {env_id} has {obs}")
    return env


class ReplayBuffer:
    """The last `capacity` steps of each env, time-major: data[name][row, env].

    Besides (s, a, r, terminated) every step stores the sampling policy mu that
    chose a (its mean and std; Algorithm 2 line 11), the next observation s'
    (the true final one when an episode ended), and the mean of the same mu at
    s', from which the backup samples a' (line 12).
    """

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        shapes = dict(
            obs=(obs_dim,), action=(act_dim,), mu_mean=(act_dim,), mu_std=(act_dim,),
            reward=(), terminated=(), episode_end=(), next_obs=(obs_dim,), next_mu_mean=(act_dim,),
        )
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

    def gather(self, row: torch.Tensor, env: torch.Tensor, horizon: int) -> dict:
        """Slices of `horizon` consecutive steps starting at (row, env), [B, T, ...].

        "last" marks where a slice must stop: an episode end, or the newest
        stored step, whose successor is not stored yet (a wrapped slice would
        otherwise run into the oldest data).
        """
        rows = (row[:, None] + torch.arange(horizon, device=self.device)) % self.capacity
        envs = env[:, None].expand_as(rows)
        out = {k: v[rows, envs] for k, v in self.data.items()}
        out["last"] = out["episode_end"] | (rows == (self.ptr - 1) % self.capacity)
        return out

    def sample(self, batch_size: int, horizon: int) -> dict:
        row = torch.randint(0, self.size, (batch_size,), device=self.device)
        env = torch.randint(0, self.num_envs, (batch_size,), device=self.device)
        return self.gather(row, env, horizon)


class ObsNormalizer(nn.Module):
    """Running mean and variance of observations, (x - mean) / (std + 1e-5).

    The authors' networks begin with such a layer (Trax Normalize), updated
    with the observations the agent acts on until `sample_limit` of them.
    It does not clip; clip > 0 clips the result to [-clip, clip] (--obs-clip).
    """

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
        if len(x) == 0:
            return
        n, total = len(x), self.count + len(x)
        delta = x.mean(0) - self.mean
        # Chan et al.'s merge of two (mean, variance, count) summaries.
        m2 = self.var * self.count + x.var(0, correction=0) * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)




class Linear(nn.Linear):
    """A hidden layer. With bf16 set (--bf16-matmuls) it multiplies bfloat16-rounded inputs, weights
    and bias with float32 sums, as the authors' runs did: on their TPU v2 (Appendix 6.1) JAX then
    computed every float32 matrix multiply from bfloat16-rounded inputs. Unlike the TPU, it rounds the
    bias too and returns bfloat16 (torch's bfloat16 matmul rounds its result)."""

    bf16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16:
            return super().forward(x)
        return nn.functional.linear(x.bfloat16(), self.weight.bfloat16(), self.bias.bfloat16())


class OutputLinear(nn.Linear):
    """A network's last layer, in float32 from float32 or (--bf16-matmuls) bfloat16 activations: it
    returns Q or the policy's mean unrounded, as the TPU did, where a bfloat16 result's 8 bits would
    round away Q's differences over the k actions, which set the advantage weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


def mlp(in_dim: int, hidden: int = 256) -> nn.Sequential:
    """The paper's torso for both networks: two layers of 256 ReLU units."""
    return nn.Sequential(Linear(in_dim, hidden), nn.ReLU(), Linear(hidden, hidden), nn.ReLU())


class QNetwork(nn.Module):
    """Q(s, a) with the paper's action embedding (Section 4, Neural architectures):
    the processed observation o is gated by one linear embedding of the action,
    o * tanh(W a + b), then the value head. The observation is processed once
    and gated by each of the k sampled actions. head="linear" is the paper's
    text; head="mlp" is the authors' Trax Value model with multiplicative
    action injection: o is projected by a linear layer before the gate, and
    the head is LayerNorm, one layer of 256 ReLU units, then linear.
    The actions are the policy's Gaussian samples, which can leave the bounds
    [low, high]; the authors' network takes them as they are. clip_actions
    gives it the action the environment executes instead, clipped.
    """

    def __init__(self, obs_dim: int, low: torch.Tensor, high: torch.Tensor, out_scale: float, head: str = "mlp",
                 clip_actions: bool = False):
        super().__init__()
        self.clip_actions = clip_actions
        self.torso, self.embed = mlp(obs_dim), Linear(len(low), 256)
        if head == "mlp":
            self.torso.append(Linear(256, 256))
            self.head = nn.Sequential(nn.LayerNorm(256), Linear(256, 256), nn.ReLU(), OutputLinear(256, 1))
        else:
            self.head = OutputLinear(256, 1)
        self.out_scale = out_scale
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [..., obs_dim] (normalised), actions [..., k, act_dim] -> Q [..., k]."""
        o = self.torso(obs).unsqueeze(-2)
        a = self.embed(actions.clamp(self.low, self.high) if self.clip_actions else actions)
        # (With --bf16-matmuls, o and a are bfloat16: the gate and the head's LayerNorm work in float32.)
        return self.head(o.float() * torch.tanh(a.float())).squeeze(-1) * self.out_scale


class Actor(nn.Module):
    """Mean of the Gaussian policy; its std is fixed (0.4, Section 4)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim), OutputLinear(256, act_dim))
        # As the authors' code: a near-zero head, so the first policy acts around 0.
        nn.init.uniform_(self.net[-1].weight, -0.01, 0.01)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


@dataclass
class Learner:
    """What QWR learns (Algorithm 2 lines 1-2) with its optimisers: built, saved and loaded as one."""

    actor: Actor
    critic: QNetwork
    target: QNetwork
    obs_norm: ObsNormalizer
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer

    SAVED = ("actor", "obs_norm", "critic", "actor_opt", "critic_opt")  # and the target, where saved


def make_learner(args: Args, obs_dim: int, action_space: gym.spaces.Box, device, obs_norm_limit: int) -> Learner:
    low, high = (torch.as_tensor(b, dtype=torch.float32, device=device) for b in (action_space.low, action_space.high))
    actor = Actor(obs_dim, len(low)).to(device)
    critic = QNetwork(obs_dim, low, high, 1 / (1 - args.gamma) if args.scale_value_targets else 1.0,
                      args.critic_head, args.critic_clips_actions).to(device)
    for layer in (*actor.modules(), *critic.modules()):
        if isinstance(layer, Linear):
            layer.bf16 = args.bf16_matmuls
    # eps=1e-5 is the default of the authors' (Trax) Adam.
    return Learner(actor, critic, copy.deepcopy(critic).requires_grad_(False),
                   ObsNormalizer(obs_dim, obs_norm_limit, args.obs_clip).to(device),
                   torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5),
                   torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5))


# ----------------------------------------------------------------------------
# Acting: collection and evaluation
# ----------------------------------------------------------------------------


@torch.no_grad()
def collect(envs, obs: np.ndarray, steps_per_env: int, actor, obs_norm, action_std: float, device):
    """Run the Gaussian policy for steps_per_env vector steps (Algorithm 2 line 5).

    Returns the rollout as tensors [steps_per_env, num_envs, ...], the
    observation to continue from, and the (return, length) of each episode that
    ended. The buffer keeps the sampled action, whose density under mu is what
    the actor regresses on; the environment executes it clipped.
    """
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
    columns = [[s[i] for s in steps] for i in range(len(names))]
    rollout = {k: torch.stack(c) if torch.is_tensor(c[0]) else torch.as_tensor(np.stack(c), device=device)
               for k, c in zip(names, columns)}
    for k in ("reward", "next_obs"):
        rollout[k] = rollout[k].float()
    rollout["mu_std"] = torch.full_like(rollout["mu_mean"], action_std)
    # mu at s', from the same policy and normaliser that acted in this rollout.
    rollout["next_mu_mean"] = actor(obs_norm(rollout["next_obs"]))
    return rollout, obs, episodes


@torch.no_grad()
def evaluate(env_id, n_episodes: int, actor, obs_norm, device, seed: int,
             video_folder: Optional[str] = None, action_std: float = 0.0) -> np.ndarray:
    """Returns of n_episodes of the deterministic policy (the mean action), or with
    action_std > 0 of the sampled Gaussian policy (the paper does not say which
    of the two its tables report)."""
    envs = make_vec_env(env_id, n_episodes, video_folder)
    obs, _ = envs.reset(seed=seed)
    noise = torch.Generator(device).manual_seed(seed)  # its own stream: evaluating leaves training's alone
    returns = np.full(n_episodes, np.nan)
    while np.isnan(returns).any():
        action = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device)))
        action += action_std * torch.randn(action.shape, generator=noise, device=device)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# ----------------------------------------------------------------------------
# The two updates of an iteration (Algorithm 2 lines 6-15 and 16-22)
# ----------------------------------------------------------------------------


def critic_step(args: Args, b: dict, critic, target, critic_opt, obs_norm) -> torch.Tensor:
    """One critic gradient step on a batch b of T-step slices (Algorithm 2 lines 12-14);
    returns (loss, mean Q, mean target) as one tensor, on the device."""
    with torch.no_grad():
        # Alg. 2 l.12: k actions a' ~ mu(.|s') at each of the T next states: [B, T, k, act_dim].
        next_actions = sample_actions(b["next_mu_mean"], b["mu_std"], args.n_samples)
        # Alg. 2 l.13: Q* = r + gamma F(Q_target(s', a'_j)), mixed over 1..T steps by TD(lambda).
        bootstrap = backup_values(target(obs_norm(b["next_obs"]), next_actions), args.backup, args.tau,
                                  args.backup_scale)
        y = td_lambda_targets(b["reward"], bootstrap, b["terminated"], b["last"], args.gamma, args.td_lambda)
    q = critic(obs_norm(b["obs"][:, 0]), b["action"][:, :1]).squeeze(-1)
    # Alg. 2 l.14: a gradient step on ||Q* - Q(s, a)||^2, in the network's own units (returns x (1 - gamma)).
    loss = ((q - y) / critic.out_scale).pow(2).mean()
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return torch.stack([loss.detach(), q.detach().mean(), y.mean()])


# What train_critic and train_actor log, and an iteration whose updates have not begun: for each of
# the two, (steps taken, the mean of each metric over them).
CRITIC_METRICS = ("critic_loss", "q_mean", "target_mean")
ACTOR_METRICS = ("actor_loss", "clipped_weight_fraction", "mean_at_bound_fraction", "q_spread", "weight_spread")
NOT_BEGUN = dict(critic=(0, (0.0,) * len(CRITIC_METRICS)), actor=(0, (0.0,) * len(ACTOR_METRICS)))


def train_critic(args: Args, buffer: ReplayBuffer, critic, target, critic_opt, obs_norm, step=critic_step,
                 done: tuple = NOT_BEGUN["critic"]) -> dict:
    """Algorithm 2 lines 6-15, with the multi-step targets of Appendix 6.4; `step` is
    critic_step or its compiled twin. done: the steps of this iteration already taken and their
    mean metrics (a stopped run going on). Returns the mean metrics of the iteration's steps
    and "critic_steps", the number taken."""
    sums, taken = torch.tensor(done[1], device=buffer.device) * done[0], done[0]
    for i in range(done[0], args.critic_steps):
        if Stop.signal:
            break
        if i % args.target_update_every == 0:  # Alg. 2 l.8-9: the target network is the critic of now
            target.load_state_dict(critic.state_dict())
        b = buffer.sample(args.batch_size, args.target_horizon)  # Alg. 2 l.11: (s, mu, a, r, s'), T steps on
        sums, taken = sums + step(args, b, critic, target, critic_opt, obs_norm), taken + 1
    return dict(zip(CRITIC_METRICS, (sums / max(1, taken)).tolist()), critic_steps=taken)


def actor_step(args: Args, b: dict, actor, critic, actor_opt, obs_norm) -> torch.Tensor:
    """One actor gradient step on a batch b of states (Algorithm 2 lines 18-21); returns the loss
    and the diagnostics of train_actor as one tensor, on the device."""
    obs = obs_norm(b["obs"][:, 0])
    actions = sample_actions(b["mu_mean"][:, 0], b["mu_std"][:, 0], args.n_samples)  # Alg. 2 l.18: [B, k, d]
    with torch.no_grad():
        # Alg. 2 l.19-20: V = mean_j Q(s, a_j), weights xi = exp((Q - V) / beta), normalised and clipped.
        q = critic(obs, actions)
        weights = advantage_weights(q, args.beta, args.max_weight)
    # Alg. 2 l.21: ascend mean_j xi_j log pi(a_j|s), pi = N(actor(s), action_std) per dimension.
    mean = actor(obs)
    z = (actions - mean.unsqueeze(1)) / args.action_std
    log_prob = (-0.5 * z.pow(2) - math.log(args.action_std * math.sqrt(2 * math.pi))).sum(-1)
    loss = -(weights * log_prob).mean()
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    actor_opt.step()
    # Diagnostics: clipped weights; policy means at or past the action bounds; how much Q
    # and the weights vary over the k actions of one state (std over k, averaged over states).
    at_bound = ((mean.detach() <= critic.low) | (mean.detach() >= critic.high)).float().mean()
    return torch.stack([loss.detach(), (weights >= args.max_weight).float().mean(), at_bound,
                        q.std(-1, correction=0).mean(), weights.std(-1, correction=0).mean()])


def train_actor(args: Args, buffer: ReplayBuffer, actor, critic, actor_opt, obs_norm, step=actor_step,
                done: tuple = NOT_BEGUN["actor"]) -> dict:
    """Algorithm 2 lines 16-22: weighted regression on k actions from the stored mu; `step` is
    actor_step or its compiled twin; done, and "actor_steps" returned, as in train_critic."""
    sums, taken = torch.tensor(done[1], device=buffer.device) * done[0], done[0]
    for _ in range(done[0], args.actor_steps):
        if Stop.signal:
            break
        b = buffer.sample(args.batch_size, 1)  # Alg. 2 l.17: (s, mu)
        sums, taken = sums + step(args, b, actor, critic, actor_opt, obs_norm), taken + 1
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
# Around the loop: the command line, seeds, logs, checkpoints, evaluation
# ----------------------------------------------------------------------------


def check_args(args: Args, offline: bool) -> None:
    """Raise UsageError for a bad command line, before anything is built."""
    defaults = Args()
    for name in ONLINE_ONLY if offline else OFFLINE_ONLY:
        if getattr(args, name) != getattr(defaults, name):
            raise UsageError(f"--{name.replace('_', '-')} applies to {'online' if offline else 'offline'} "
                             f"training only (--offline-dataset-id {'given' if offline else 'not given'})")
    problems = [
        (args.total_timesteps % args.steps_per_iteration != 0,
         "--total-timesteps must be a multiple of --steps-per-iteration"),
        (args.steps_per_iteration % args.num_envs != 0,
         "--steps-per-iteration must be a multiple of --num-envs"),
        (args.buffer_size < args.steps_per_iteration,
         "--buffer-size must hold at least one iteration of steps"),
        (min(args.n_samples, args.target_horizon, args.batch_size, args.num_envs) < 1,
         "--n-samples, --target-horizon, --batch-size and --num-envs must be >= 1"),
        (min(args.critic_steps, args.actor_steps, args.eval_episodes) < 0,
         "step and episode counts cannot be negative"),
        (not 0 <= args.td_lambda <= 1, "--td-lambda must be in [0, 1]"),
        (not 0 < args.gamma <= 1, "--gamma must be in (0, 1]"),
        (args.scale_value_targets and args.gamma == 1, "--scale-value-targets needs --gamma < 1"),
        (args.backup == "lse" and args.tau <= 0, "--tau must be > 0 for the lse backup"),
        (min(args.beta, args.max_weight, args.action_std, args.actor_lr, args.critic_lr) <= 0,
         "--beta, --max-weight, --action-std and the learning rates must be > 0"),
        (args.target_update_every < 1 or args.eval_every < 1 or args.offline_iterations < 1,
         "--target-update-every, --eval-every and --offline-iterations must be >= 1"),
        (args.eval_only and not args.checkpoint_path, "--eval-only needs --checkpoint-path"),
        (args.checkpoint_path and not os.path.isfile(args.checkpoint_path),
         f"checkpoint not found: {args.checkpoint_path}"),
        (args.save_dataset and args.checkpoint_path,
         "--save-dataset needs a run from scratch: it writes every step that run collects"),
        (args.policy_dataset_episodes < 1, "--policy-dataset-episodes must be >= 1"),
        (args.obs_clip < 0, "--obs-clip must be >= 0 (0: no clip)"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)
    if args.save_dataset or args.save_policy_dataset or offline:
        try:
            import minari
        except ImportError:
            raise UsageError("datasets need minari: pip install 'minari[hdf5,hf]'") from None
        for flag, dataset_id in (("--save-dataset", args.save_dataset),
                                 ("--save-policy-dataset", args.save_policy_dataset)):
            if dataset_id and dataset_id in minari.list_local_datasets():
                raise UsageError(f"{flag}: dataset {dataset_id} exists already; choose another id or version")


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


def load_checkpoint(args: Args, learner: Learner, buffer: Optional[ReplayBuffer]) -> tuple:
    """Load --checkpoint-path into learner (and buffer, online); return its iterations done, run
    name, and the steps done of the next iteration where it stopped inside one (or None).
    A file that does not fit this run is refused with one line naming it and the mismatch."""
    path = args.checkpoint_path
    try:
        ckpt = torch.load(path, map_location=learner.critic.low.device, weights_only=False)
    except Exception as e:  # not a file torch can read: say so, not a pickle stack trace
        raise UsageError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line(e)[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script", SCRIPT) != SCRIPT or not set(Learner.SAVED) <= set(ckpt):
        script = ckpt.get("script", "another script") if isinstance(ckpt, dict) else "not a dict"
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} ({script})")
    if ckpt["args"]["env_id"] != args.env_id:
        raise UsageError(f"{path} was trained on {ckpt['args']['env_id']}, not {args.env_id}")
    # What the networks were trained on but their weights do not hold: a run goes on (or is evaluated) with it.
    for k in ("obs_clip",) if args.eval_only else ("obs_clip", "critic_clips_actions", "bf16_matmuls"):
        if ckpt["args"].get(k, getattr(args, k)) != getattr(args, k):
            flag, v = k.replace("_", "-"), ckpt["args"][k]
            raise UsageError(f"{path} was trained with " + (f"--{flag} {v}" if not isinstance(v, bool)
                                                             else f"--{flag}" if v else f"--no-{flag}"))
    for k in ("actor", "obs_norm") if args.eval_only else Learner.SAVED:
        try:
            getattr(learner, k).load_state_dict(ckpt[k])
        except (RuntimeError, ValueError, KeyError) as e:  # another network size, head or optimiser
            raise UsageError(f"{path}: its {k} does not fit this run's ({str(e).strip().splitlines()[-1][:160]})")
    steps_flags = ("critic_steps", "actor_steps", "target_update_every")
    if ckpt.get("partial") and not args.eval_only and any(ckpt["args"][k] != getattr(args, k) for k in steps_flags):
        wanted = " ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k in steps_flags)
        raise UsageError(f"{path} stopped inside an iteration's updates: resume it with {wanted}")
    if "target" in ckpt and not args.eval_only:  # the target of the moment (a stop between two copies)
        learner.target.load_state_dict(ckpt["target"])
    if buffer is not None and not args.eval_only:
        if ckpt["buffer"]["obs"].shape != buffer.data["obs"].shape:
            raise UsageError(f"{path}: resume with the checkpoint's --buffer-size and --num-envs")
        buffer.data, buffer.ptr, buffer.size = ckpt["buffer"], ckpt["buffer_ptr"], ckpt["buffer_size"]
        # The environments restart, so the stored episode in progress ends here.
        buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True
    if "rng" in ckpt and not args.eval_only:  # the random streams go on where they stopped
        random.setstate(ckpt["rng"]["python"])
        np_state = ckpt["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], np.uint32), *np_state[2:]))
        torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["iteration"], ckpt.get("run_name"), ckpt.get("partial")


def save_checkpoint(path: str, args: Args, learner: Learner, iteration: int, run_name: str,
                    buffer: Optional[ReplayBuffer], partial: Optional[dict] = None) -> None:
    """iteration: the iterations done; partial: the critic and actor steps done of the next one,
    whose steps are already collected, when a stop came between two of its gradient steps."""
    np_state = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
               torch=torch.get_rng_state())
    ckpt = {k: getattr(learner, k).state_dict() for k in Learner.SAVED} | dict(
        script=SCRIPT, args=asdict(args), iteration=iteration, partial=partial, run_name=run_name, rng=rng,
        target=learner.target.state_dict(),
        buffer=buffer and buffer.data, buffer_ptr=buffer and buffer.ptr, buffer_size=buffer and buffer.size)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed mid-write leaves the last good checkpoint


def check_finite(args: Args, metrics: dict, step: int) -> None:
    """A FloatingPointError naming the sensitive flags set away from their defaults, if a loss is not finite."""
    if not all(math.isfinite(metrics[k]) for k in ("critic_loss", "actor_loss", "q_mean")):
        defaults = Args()
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SENSITIVE if getattr(args, k) != getattr(defaults, k)]
        raise FloatingPointError(f"non-finite losses at step {step} (critic {metrics['critic_loss']}, actor "
                                 f"{metrics['actor_loss']}); likely cause: {', '.join(changed) or 'none of the flags'}")


def end_of_iteration(args: Args, writer, learner: Learner, metrics: dict, step: int, evaluate_now: bool,
                     run_name: str, device, refs: Optional[tuple] = None, buffer=None, eval_env=None) -> str:
    """Log an iteration's metrics; when evaluate_now, evaluate the policy (deterministic and
    sampled; in eval_env, an offline dataset's EnvSpec, else in --env-id) and write a checkpoint
    if asked. Returns the status line's evaluation part."""
    check_finite(args, metrics, step)
    for k in ("critic_loss", "actor_loss", "q_mean", "target_mean", "clipped_weight_fraction"):
        writer.add_scalar(f"losses/{k}", metrics[k], step)
    for k in ("mean_at_bound_fraction", "q_spread", "weight_spread"):
        writer.add_scalar(f"diagnostics/{k}", metrics[k], step)
    writer.add_scalar("charts/seconds_per_iteration", metrics["seconds_per_iteration"], step)
    if not evaluate_now or args.eval_episodes == 0:
        return ""
    seed, video = args.seed + 10_000, f"videos/{run_name}/step{step}" if args.capture_video else None
    for key, std in (("eval_return", 0.0), ("eval_return_sampled", args.action_std)):
        returns = evaluate(eval_env or args.env_id, args.eval_episodes, learner.actor, learner.obs_norm, device, seed,
                           None if std else video, std)
        metrics[key] = float(returns.mean())
        writer.add_scalar(f"charts/{key}", metrics[key], step)
    line = f" | eval return {metrics['eval_return']:.1f} (sampled {metrics['eval_return_sampled']:.1f})"
    if refs:  # D4RL's normalised score: 0 random, 100 expert
        metrics["normalized_score"] = 100 * (metrics["eval_return"] - refs[0]) / (refs[1] - refs[0])
        writer.add_scalar("charts/normalized_score", metrics["normalized_score"], step)
        line += f" (score {metrics['normalized_score']:.1f})"
    if args.save_model:
        metrics["checkpoint"] = f"runs/{run_name}/{args.exp_name}.pt"
        save_checkpoint(metrics["checkpoint"], args, learner, metrics["iteration"], run_name, buffer)
    return line


def evaluate_checkpoint(args: Args, env, device) -> dict:
    """--eval-only: the policy of --checkpoint-path evaluated in env (an id, or an offline dataset's
    EnvSpec, whose arguments its id alone would lose), deterministic; nothing is trained."""
    spaces = check_env(env)
    learner = make_learner(args, spaces.observation_space.shape[0], spaces.action_space, device, 1)
    _, run_name, _ = load_checkpoint(args, learner, None)
    returns = evaluate(env, args.eval_episodes, learner.actor, learner.obs_norm, device, args.seed + 10_000,
                       f"videos/{run_name or args.exp_name}" if args.capture_video else None)
    print(f"eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes")
    return {"eval_return": float(returns.mean()), "eval_returns": returns.tolist()}


def stop_inside(args: Args, learner: Learner, metrics: dict, iteration: int, step: int, run_name: str, buffer=None,
                **progress) -> None:
    """After an iteration's updates: if a Stop cut them short, save the run with the steps taken,
    their mean metrics and `progress` (the iteration's seconds so far and its episodes), so that the
    resumed run takes the rest and logs the iteration as a whole; then exit."""
    done = dict(critic=(metrics["critic_steps"], [metrics[k] for k in CRITIC_METRICS]),
                actor=(metrics["actor_steps"], [metrics[k] for k in ACTOR_METRICS]), **progress)
    if Stop.signal and (done["critic"][0] < args.critic_steps or done["actor"][0] < args.actor_steps):
        check_finite(args, metrics, step)  # a diverged run is not saved over its last good checkpoint
        exit_interrupted(args, learner, iteration, run_name, buffer, done)


def exit_interrupted(args: Args, learner: Learner, iteration: int, run_name: str, buffer=None,
                     partial: Optional[dict] = None) -> None:
    """After Stop.signal: save the run as it stands (iteration done, and the steps done of the
    next one) and exit with the command that resumes it."""
    path = os.path.abspath(f"runs/{run_name}/{args.exp_name}.pt")
    save_checkpoint(path, args, learner, iteration, run_name, buffer, partial)
    defaults = asdict(Args())
    flags = [(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
             else f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items() if v != defaults[k]
             and k not in ("checkpoint_path", "save_dataset")]
    command = shlex.join(["python", SCRIPT, *flags, f"--checkpoint-path={path}"])
    if args.save_dataset:  # it needs every step of one process (check_args)
        command += f" (no dataset: --save-dataset {args.save_dataset} needs a run from scratch)"
    where = (f"in iteration {iteration + 1}, after {partial['critic'][0]} of {args.critic_steps} critic and "
             f"{partial['actor'][0]} of {args.actor_steps} actor steps" if partial else f"after iteration {iteration}")
    print(f"stopped by {signal.Signals(Stop.signal).name} {where}, saved; resume with: {command}",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + Stop.signal)


# ----------------------------------------------------------------------------
# Training: online (Algorithm 2), then offline (Section 4.4)
# ----------------------------------------------------------------------------


def train(args: Args) -> dict:
    """Online QWR (Algorithm 2); returns the final metrics."""
    args = replace(args, env_id=args.env_id or DEFAULT_ENV_ID)
    check_args(args, offline=False)
    # The env's own action space: the vector env's ClipAction accepts any action, so its bounds are infinite.
    action_space = check_env(args.env_id).action_space
    device = seed_and_device(args)
    if args.eval_only:  # evaluate the checkpoint's policy, nothing else
        return evaluate_checkpoint(args, args.env_id, device)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    envs = make_vec_env(args.env_id, args.num_envs)
    obs_dim = envs.single_observation_space.shape[0]
    # Alg. 2 l.1-3: random actor and critic parameters, an empty replay buffer D.
    learner = make_learner(args, obs_dim, action_space, device, args.obs_norm_sample_limit)
    buffer = ReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, obs_dim, action_space.shape[0], device)
    start, partial = 0, None
    if args.checkpoint_path:  # the same run goes on: its log directory, step counter and random state
        start, saved_name, partial = load_checkpoint(args, learner, buffer)
        run_name = saved_name or run_name
    writer = open_writer(args, run_name)
    critic_update, actor_update = compiled(critic_step, args, device), compiled(actor_step, args, device)
    n_iterations = args.total_timesteps // args.steps_per_iteration
    print(f"QWR-{args.backup} on {args.env_id} ({device}), {n_iterations} iterations, logs in runs/{run_name}")
    # A resumed run restarts its episodes; a new seed keeps them from repeating the first iteration's.
    obs, _ = envs.reset(seed=args.seed + start)
    # (a run stopped inside an iteration counts that iteration's seconds before the stop)
    collected, metrics, start_time = [], {}, time.time() - (partial or {}).get("seconds", 0.0)
    for iteration in range(start, n_iterations):  # Alg. 2 l.4
        step = (iteration + 1) * args.steps_per_iteration
        # A run stopped inside this iteration's updates has collected its steps: it takes the remaining updates.
        done = partial if iteration == start and partial else NOT_BEGUN
        iteration_start = time.time() - done.get("seconds", 0.0)
        episodes = done.get("episodes", [])  # a stopped run's, logged by it
        if done is NOT_BEGUN:
            # Alg. 2 l.5: add trajectories sampled by pi_theta to D, each step with the mu that chose it.
            rollout, obs, episodes = collect(envs, obs, args.steps_per_iteration // args.num_envs, learner.actor,
                                             learner.obs_norm, args.action_std, device)
            learner.obs_norm.update(rollout["obs"])
            buffer.add(rollout)
            if args.save_dataset:
                collected.append({k: v.cpu() for k, v in rollout.items()})
            for ret, length in episodes:
                writer.add_scalar("charts/episodic_return", ret, step)
                writer.add_scalar("charts/episodic_length", length, step)

        metrics = train_critic(args, buffer, learner.critic, learner.target, learner.critic_opt, learner.obs_norm,
                               critic_update, done["critic"])
        metrics |= train_actor(args, buffer, learner.actor, learner.critic, learner.actor_opt, learner.obs_norm,
                               actor_update, done["actor"])
        stop_inside(args, learner, metrics, iteration, step, run_name, buffer, episodes=episodes,
                    seconds=time.time() - iteration_start)

        sps = int((step - start * args.steps_per_iteration) / (time.time() - start_time))
        metrics |= dict(iteration=iteration + 1, global_step=step, sps=sps,
                        seconds_per_iteration=time.time() - iteration_start)
        writer.add_scalar("charts/SPS", sps, step)
        line = f"iter {iteration + 1}/{n_iterations} step {step}"
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
            line += f" | train return {metrics['episodic_return']:.1f}"
        evaluate_now = (iteration + 1) % args.eval_every == 0 or iteration + 1 == n_iterations
        line += end_of_iteration(args, writer, learner, metrics, step, evaluate_now, run_name, device, buffer=buffer)
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | {sps} SPS, "
              f"{metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
        if Stop.signal:
            exit_interrupted(args, learner, iteration + 1, run_name, buffer)
    envs.close()
    writer.close()
    write_datasets(args, collected, learner, device, run_name, action_space)
    print(f"done: eval return {metrics.get('eval_return', float('nan')):.1f} at step {n_iterations * args.steps_per_iteration}, "
          f"{(time.time() - start_time) / 60:.1f} min" if metrics else
          f"nothing left to train: the checkpoint is at iteration {start} of {n_iterations}")
    return metrics | {"run_name": run_name}


def train_offline(args: Args) -> dict:
    """Offline QWR (Section 4.4): the same two updates on a fixed Minari dataset, with
    mu = N(action taken, --action-std) at every state; returns the final metrics."""
    check_args(args, offline=True)
    device = seed_and_device(args)
    if args.eval_only:  # the checkpoint's policy in the dataset's evaluation env; no buffer of its steps
        env_spec = eval_env_spec(open_dataset(args.offline_dataset_id, args.download), args.offline_dataset_id)
    else:
        buffer, env_spec, refs = load_dataset(args.offline_dataset_id, args.download, args.action_std, device)
    if args.env_id not in (None, env_spec.id):
        raise UsageError(f"--env-id {args.env_id} is not the dataset's environment, {env_spec.id}")
    args = replace(args, env_id=env_spec.id)  # evaluate where the dataset says
    if args.eval_only:
        return evaluate_checkpoint(args, env_spec, device)
    env = check_env(env_spec)
    # policy_episodes and write_dataset make their envs by id: they would lose this spec's arguments.
    registered = gym.registry.get(env_spec.id)
    if args.save_policy_dataset and (registered is None or registered.kwargs != env_spec.kwargs):
        raise UsageError(f"--save-policy-dataset after offline training needs an env that its id alone makes; "
                         f"{env_spec.id} is made with other arguments here")
    run_name = f"{env_spec.id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    # Normalised by the statistics of the whole dataset.
    learner = make_learner(args, env.observation_space.shape[0], env.action_space, device, buffer.size)
    learner.obs_norm.update(buffer.data["obs"])
    start, partial = 0, None
    if args.checkpoint_path:
        start, saved_name, partial = load_checkpoint(args, learner, None)
        run_name = saved_name or run_name
    writer = open_writer(args, run_name)
    critic_update, actor_update = compiled(critic_step, args, device), compiled(actor_step, args, device)
    # Every dataset episode ends with episode_end, so this is the mean episode return.
    dataset_return = (buffer.data["reward"].sum() / buffer.data["episode_end"].sum()).item()
    writer.add_scalar("charts/dataset_return", dataset_return, 0)
    print(f"QWR-{args.backup} offline from {args.offline_dataset_id} ({buffer.size} steps, mean return "
          f"{dataset_return:.1f}; {device}), {args.offline_iterations} iterations, logs in runs/{run_name}")
    metrics, start_time = {}, time.time()
    for iteration in range(start, args.offline_iterations):  # the x-axis counts iterations: no env steps
        done = partial if iteration == start and partial else NOT_BEGUN
        iteration_start = time.time() - done.get("seconds", 0.0)
        metrics = train_critic(args, buffer, learner.critic, learner.target, learner.critic_opt, learner.obs_norm,
                               critic_update, done["critic"])
        metrics |= train_actor(args, buffer, learner.actor, learner.critic, learner.actor_opt, learner.obs_norm,
                               actor_update, done["actor"])
        stop_inside(args, learner, metrics, iteration, iteration + 1, run_name, seconds=time.time() - iteration_start)
        metrics |= dict(iteration=iteration + 1, global_step=iteration + 1, dataset_return=dataset_return,
                        seconds_per_iteration=time.time() - iteration_start)
        evaluate_now = (iteration + 1) % args.eval_every == 0 or iteration + 1 == args.offline_iterations
        line = f"iter {iteration + 1}/{args.offline_iterations}" + end_of_iteration(
            args, writer, learner, metrics, iteration + 1, evaluate_now, run_name, device, refs, eval_env=env_spec)
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | "
              f"{metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
        if Stop.signal:
            exit_interrupted(args, learner, iteration + 1, run_name)
    writer.close()
    write_datasets(args, [], learner, device, run_name, env.action_space)
    print(f"done: eval return {metrics.get('eval_return', float('nan')):.1f} after {args.offline_iterations} "
          f"iterations, {(time.time() - start_time) / 60:.1f} min" if metrics else
          f"nothing left to train: the checkpoint is at iteration {start} of {args.offline_iterations}")
    return metrics | {"run_name": run_name, "dataset_return": dataset_return}


# ----------------------------------------------------------------------------
# Datasets (Minari): written from what the agent collected, read back offline
# ----------------------------------------------------------------------------

# D4RL's random and expert returns, for normalised scores (0 random, 100 expert).
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3),
                   "Walker2d": (1.629008, 4592.3)}


def episodes_of(rollouts: list, low: np.ndarray, high: np.ndarray) -> list:
    """Cut rollouts ([steps, num_envs] each, in order) into each env's episodes:
    observations (T + 1, the last the true final one), the actions the env
    executed (clipped), rewards, terminations, truncations. An episode still
    running when collection stopped ends there, truncated."""
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
    steps = sum(len(ep["rewards"]) for ep in episodes)
    print(f"wrote Minari dataset {dataset_id}: {len(episodes)} episodes, {steps} steps")


MAKE_ONE = "python qwr_continuous.py --env-id Hopper-v4 --save-dataset local/hopper/replay-v0 (README: offline)"


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def open_dataset(dataset_id: str, download: bool):
    """The Minari dataset from the local store ($MINARI_DATASETS_PATH), downloaded by Minari
    (which shows its progress) when it is not there and download is on; or a one-line error
    that says how to get it."""
    import minari

    where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    found = ", ".join(sorted(minari.list_local_datasets())) or "none"
    elsewhere = (f"local datasets: {found}; to get it, run `minari download {dataset_id}` on a machine with "
                 f"internet and copy it into {where}, or make one here: {MAKE_ONE}")
    try:  # the local store first: its errors (a broken file, a missing h5py) are not about the network
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        if not download:
            raise UsageError(f"no Minari dataset {dataset_id!r} in {where} (--no-download); {elsewhere}") from None
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ImportError as e:  # Minari's own hint: downloading needs its hf extra (huggingface_hub)
        raise UsageError(f"cannot download {dataset_id}: {first_line(e)}") from None
    except ValueError as e:  # a malformed id, or one that Minari's server does not have
        raise UsageError(f"no Minari dataset {dataset_id!r}: {first_line(e)}; {elsewhere}") from None
    except Exception as e:  # no network: the HTTP client's own error, whatever its class
        raise UsageError(f"cannot download Minari dataset {dataset_id!r} ({type(e).__name__}: {first_line(e)}); "
                         f"{elsewhere}") from None


def flat_obs(space: gym.Space, obs) -> np.ndarray:
    """A dataset's observations [T, ...] as flat vectors [T, n]: the parts of a Dict space
    (nested ones too) joined in the space's order, as gymnasium's FlattenObservation does."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flat_obs(sub, obs[k]) for k, sub in space.spaces.items()], -1)
    return np.asarray(obs, np.float32).reshape(len(obs), -1)


def eval_env_spec(dataset, dataset_id: str):
    """The environment the dataset describes for evaluation (Minari's eval_env_spec, else the
    one it was collected in), checked by making it once; a missing package is one line."""
    try:
        env = dataset.recover_environment(eval_env=True)
    except ModuleNotFoundError as e:  # e.g. gymnasium_robotics, for kitchen, antmaze and Adroit
        package = (e.name or "?").split(".")[0].replace("_", "-")
        raise UsageError(f"{dataset_id} evaluates in an environment of {package}: pip install {package}") from None
    except (gym.error.Error, ValueError, TypeError) as e:  # no env stored, or kwargs this version does not take
        raise UsageError(f"cannot make {dataset_id}'s environment: {first_line(e)}") from None
    spec = env.spec
    env.close()
    return spec


def load_dataset(dataset_id: str, download: bool, action_std: float, device) -> tuple:
    """A Minari dataset as a one-env replay buffer, with mu = N(a_taken, action_std)
    at every state (Section 4.4: the dataset holds no sampling policy). The
    final observation of an episode has no action taken; mu there is centred
    on the episode's last action. Returns the buffer, the EnvSpec to evaluate
    in, and the (random, expert) returns for normalised scores, or None."""
    dataset = open_dataset(dataset_id, download)
    spec = eval_env_spec(dataset, dataset_id)
    env = gym.make(spec)
    obs_space = env.observation_space  # a Dict is flattened here as make_env flattens the env's
    env.close()
    parts = {k: [] for k in ("obs", "next_obs", "action", "next_mu_mean", "reward", "terminated", "episode_end")}
    for ep in dataset.iterate_episodes():
        n, obs = len(ep.rewards), flat_obs(obs_space, ep.observations)
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])
        parts["action"].append(ep.actions)
        parts["next_mu_mean"].append(np.concatenate([ep.actions[1:], ep.actions[-1:]]))
        parts["reward"].append(ep.rewards)
        parts["terminated"].append(ep.terminations)
        parts["episode_end"].append(np.arange(n) == n - 1)
    data = {k: torch.as_tensor(np.concatenate(v)).unsqueeze(1).to(device) for k, v in parts.items()}
    for k in ("obs", "next_obs", "action", "next_mu_mean", "reward"):
        data[k] = data[k].float()
    data["mu_mean"] = data["action"]
    data["mu_std"] = torch.full_like(data["action"], action_std)
    buffer = ReplayBuffer(len(data["reward"]), 1, data["obs"].shape[-1], data["action"].shape[-1], device)
    buffer.add(data)
    meta = dataset.storage.metadata
    refs = ((meta["ref_min_score"], meta["ref_max_score"]) if meta.get("ref_max_score") is not None
            else D4RL_REF_SCORES.get(spec.id.split("/")[-1].split("-")[0]))  # D4RL's, for its MuJoCo tasks
    return buffer, spec, refs


def policy_episodes(env_id: str, n: int, actor, obs_norm, action_std: float, device, seed: int, action_space) -> list:
    """One episode in each of n environments, acting with the Gaussian policy; the dataset keeps the
    actions clipped to action_space, the env's own (ClipAction's are infinite)."""
    envs = make_vec_env(env_id, n)
    obs, _ = envs.reset(seed=seed)
    horizon = gym.spec(env_id).max_episode_steps or 1000  # every env ends an episode by then
    rollout, _, _ = collect(envs, obs, horizon, actor, obs_norm, action_std, device)
    envs.close()
    low, high = action_space.low, action_space.high
    return [episodes_of([{k: v[:, e : e + 1] for k, v in rollout.items()}], low, high)[0] for e in range(n)]


def write_datasets(args: Args, collected: list, learner: Learner, device, run_name: str, action_space) -> None:
    """--save-dataset (every step collected) and --save-policy-dataset (episodes of the final policy)."""
    if args.save_dataset:
        write_dataset(args.save_dataset, episodes_of(collected, action_space.low, action_space.high), args.env_id,
                      f"every step of {args.total_timesteps} collected by qwr_continuous.py (seed {args.seed})")
    if args.save_policy_dataset:
        episodes = policy_episodes(args.env_id, args.policy_dataset_episodes, learner.actor, learner.obs_norm,
                                   args.action_std, device, args.seed + 20_000, action_space)
        write_dataset(args.save_policy_dataset, episodes, args.env_id,
                      f"episodes of QWR's Gaussian policy (std {args.action_std}) after {run_name}")


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    Stop.catch_signals()
    try:
        (train_offline if cli_args.offline_dataset_id else train)(cli_args)
    except UsageError as e:
        sys.exit(f"error: {e}")
