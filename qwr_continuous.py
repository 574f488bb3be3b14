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
each is a flag that says so. Offline (Section 4.4), the same updates run on a
Minari dataset with mu = N(action taken, 0.4); the online mode can write one.

    python qwr_continuous.py --env-id Walker2d-v4
    python qwr_continuous.py --offline-dataset-id local/walker2d/qwr-replay-v0
"""

import copy
import math
import os
import random
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
    env_id: str = "Walker2d-v4"
    """gymnasium id of an environment with a continuous (Box) action space"""
    total_timesteps: int = 100_000
    """environment steps in total (the paper's 100K budget, Table 1)"""
    num_envs: int = 1
    """parallel environments that share the per-iteration step budget"""

    # Algorithm 2 schedule (Table 4)
    steps_per_iteration: int = 1000
    """environment steps collected per iteration (Table 4, n_iterations row)"""
    critic_steps: int = 1000
    """critic gradient steps per iteration (n_critic_steps)"""
    actor_steps: int = 1000
    """actor gradient steps per iteration (n_actor_steps)"""
    target_update_every: int = 100
    """critic steps between copies of the critic into the target (update_frequency)"""
    batch_size: int = 256
    """states per gradient step, for actor and critic"""
    buffer_size: int = 50_000
    """replay buffer capacity in environment steps"""
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
    n_steps: int = 3
    """T, the horizon of the multi-step targets ("margin")"""
    td_lambda: float = 0.95
    """lambda of the truncated TD(lambda) mix of the 1..T-step targets (Eq. 13)"""
    gamma: float = 0.99
    """discount factor"""
    critic_head: Literal["mlp", "linear"] = "mlp"
    """value head after the action gate: LayerNorm + 256 ReLU + linear (authors' code), or linear"""
    scale_value_targets: bool = True
    """critic outputs Q * (1 - gamma) (per-step units), as the authors' code does"""

    # Actor (Eq. 3)
    beta: float = 1.0
    """temperature of the advantage weights exp(A / beta)"""
    max_weight: float = 20.0
    """advantage weights are clipped at this value"""
    action_std: float = 0.4
    """fixed standard deviation of the Gaussian policy"""
    obs_norm_sample_limit: int = 300_000
    """observations after which the running mean/std normaliser freezes (authors' code); 0 turns it off"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate the deterministic policy every this many iterations (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    capture_video: bool = False
    """record the first episode of each evaluation to videos/"""
    save_model: bool = False
    """write a checkpoint (networks, optimisers, replay buffer) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""

    # Offline datasets (Minari, https://minari.farama.org; stored under $MINARI_DATASETS_PATH)
    save_dataset: Optional[str] = None
    """Minari id (e.g. local/walker2d/qwr-replay-v0): at the end, write every step collected as a dataset"""
    save_policy_dataset: Optional[str] = None
    """Minari id: at the end, write --policy-dataset-episodes episodes of the trained (stochastic) policy"""
    policy_dataset_episodes: int = 50
    """episodes in the --save-policy-dataset dataset (the paper's offline datasets have 50, Fig. 3)"""
    offline_dataset_id: Optional[str] = None
    """train from this Minari dataset without env interaction, mu = N(action taken, --action-std) (Section 4.4)"""
    offline_iterations: int = 30
    """iterations of critic and actor steps in offline mode (Section 4.4)"""


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


# ----------------------------------------------------------------------------
# The math of QWR, as pure functions (tests/ check them against hand values)
# ----------------------------------------------------------------------------


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
    mean = q.mean(-1, keepdim=True)
    # log-sum-exp is shift-invariant: centring on the mean keeps exp() in range.
    lse = safe_temp * (torch.logsumexp((q - mean) / safe_temp, -1) - math.log(q.shape[-1]))
    return torch.where(temp > 0, mean.squeeze(-1) + lse, mean.squeeze(-1))


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
# Environment, replay buffer, networks
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
            f"qwr_continuous.py needs a continuous (Box) action space, "
            f"but {args.env_id} has {act}"
        )
    if not np.all(np.isfinite(act.low)) or not np.all(np.isfinite(act.high)):
        raise UsageError(f"{args.env_id}'s action space has infinite bounds: {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise UsageError(f"qwr_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    check_dataset_args(args)
    problems = [
        (args.total_timesteps % args.steps_per_iteration != 0,
         "--total-timesteps must be a multiple of --steps-per-iteration"),
        (args.steps_per_iteration % args.num_envs != 0,
         "--steps-per-iteration must be a multiple of --num-envs"),
        (args.buffer_size < args.steps_per_iteration,
         "--buffer-size must hold at least one iteration of steps"),
        (min(args.n_samples, args.n_steps, args.batch_size, args.num_envs) < 1,
         "--n-samples, --n-steps, --batch-size and --num-envs must be >= 1"),
        (min(args.critic_steps, args.actor_steps, args.eval_episodes) < 0,
         "step and episode counts cannot be negative"),
        (not 0 <= args.td_lambda <= 1, "--td-lambda must be in [0, 1]"),
        (not 0 < args.gamma <= 1, "--gamma must be in (0, 1]"),
        (args.scale_value_targets and args.gamma == 1, "--scale-value-targets needs --gamma < 1"),
        (args.backup == "lse" and args.tau <= 0, "--tau must be > 0 for the lse backup"),
        (min(args.beta, args.max_weight, args.action_std, args.actor_lr, args.critic_lr) <= 0,
         "--beta, --max-weight, --action-std and the learning rates must be > 0"),
        (args.target_update_every < 1 or args.eval_every < 1,
         "--target-update-every and --eval-every must be >= 1"),
        (args.eval_only and not args.checkpoint_path, "--eval-only needs --checkpoint-path"),
        (args.checkpoint_path and not os.path.isfile(args.checkpoint_path),
         f"checkpoint not found: {args.checkpoint_path}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def check_dataset_args(args: Args) -> None:
    if not (args.save_dataset or args.save_policy_dataset or args.offline_dataset_id):
        return
    try:
        import minari
    except ImportError:
        raise UsageError("datasets need minari: pip install 'minari[hdf5]'") from None
    outputs = (("--save-dataset", args.save_dataset), ("--save-policy-dataset", args.save_policy_dataset))
    for flag, dataset_id in outputs:
        if dataset_id and dataset_id in minari.list_local_datasets():
            raise UsageError(f"{flag}: dataset {dataset_id} exists already; choose another id or version")
    if args.save_dataset and (args.checkpoint_path or args.offline_dataset_id):
        raise UsageError("--save-dataset needs a run from scratch: it writes every step that run collects")
    if args.policy_dataset_episodes < 1:
        raise UsageError("--policy-dataset-episodes must be >= 1")


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

    def gather(self, row: torch.Tensor, env: torch.Tensor, n_steps: int) -> dict:
        """Slices of n_steps consecutive steps starting at (row, env), [B, T, ...].

        "last" marks where a slice must stop: an episode end, or the newest
        stored step, whose successor is not stored yet (a wrapped slice would
        otherwise run into the oldest data).
        """
        rows = (row[:, None] + torch.arange(n_steps, device=self.device)) % self.capacity
        envs = env[:, None].expand_as(rows)
        out = {k: v[rows, envs] for k, v in self.data.items()}
        out["last"] = out["episode_end"] | (rows == (self.ptr - 1) % self.capacity)
        return out

    def sample(self, batch_size: int, n_steps: int) -> dict:
        row = torch.randint(0, self.size, (batch_size,), device=self.device)
        env = torch.randint(0, self.num_envs, (batch_size,), device=self.device)
        return self.gather(row, env, n_steps)


class ObsNormalizer(nn.Module):
    """Running mean and variance of observations, (x - mean) / (std + 1e-5).

    The authors' networks begin with such a layer (Trax Normalize), updated
    with the observations the agent acts on until `sample_limit` of them.
    """

    def __init__(self, dim: int, sample_limit: int):
        super().__init__()
        self.sample_limit = sample_limit
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var.sqrt() + 1e-5)

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


# ----------------------------------------------------------------------------
# Offline datasets (Minari): written from what the agent collected, read back
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


def load_dataset(dataset_id: str, action_std: float, device) -> tuple:
    """A Minari dataset as a one-env replay buffer, with mu = N(a_taken, action_std)
    at every state (Section 4.4: the dataset holds no sampling policy). The
    final observation of an episode has no action taken; mu there is centred
    on the episode's last action. Returns the buffer, the dataset's env id, and
    its reference (random, expert) returns for normalised scores, or None."""
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError):
        found = ", ".join(sorted(minari.list_local_datasets())) or "none"
        where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise UsageError(f"no Minari dataset {dataset_id!r} in {where} (found: {found}); make one with "
                         f"python qwr_continuous.py --env-id Walker2d-v4 --save-dataset {dataset_id}") from None
    parts = {k: [] for k in ("obs", "next_obs", "action", "next_mu_mean", "reward", "terminated", "episode_end")}
    for ep in dataset.iterate_episodes():
        n = len(ep.rewards)
        parts["obs"].append(ep.observations[:-1])
        parts["next_obs"].append(ep.observations[1:])
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
    refs = (meta["ref_min_score"], meta["ref_max_score"]) if meta.get("ref_max_score") is not None else None
    return buffer, dataset.env_spec.id, refs


def mlp(in_dim: int, hidden: int = 256) -> nn.Sequential:
    """The paper's torso for both networks: two layers of 256 ReLU units."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class QNetwork(nn.Module):
    """Q(s, a) with the paper's action embedding (Section 4, Neural architectures):
    the processed observation o is gated by one linear embedding of the action,
    o * tanh(W a + b), then the value head. The observation is processed once
    and gated by each of the k sampled actions. head="linear" is the paper's
    text; head="mlp" is the authors' Trax Value model with multiplicative
    action injection: o is projected by a linear layer before the gate, and
    the head is LayerNorm, one layer of 256 ReLU units, then linear.
    """

    def __init__(self, obs_dim: int, act_dim: int, out_scale: float, head: str = "mlp"):
        super().__init__()
        self.torso, self.embed = mlp(obs_dim), nn.Linear(act_dim, 256)
        if head == "mlp":
            self.torso.append(nn.Linear(256, 256))
            self.head = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        else:
            self.head = nn.Linear(256, 1)
        self.out_scale = out_scale

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [..., obs_dim] (normalised), actions [..., k, act_dim] -> Q [..., k]."""
        o = self.torso(obs).unsqueeze(-2)
        return self.head(o * torch.tanh(self.embed(actions))).squeeze(-1) * self.out_scale


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


# ----------------------------------------------------------------------------
# Data collection, evaluation, training
# ----------------------------------------------------------------------------


@torch.no_grad()
def collect(envs, obs: np.ndarray, n_steps: int, actor, obs_norm, action_std: float, device):
    """Run the Gaussian policy for n_steps vector steps (Algorithm 2 line 5).

    Returns the rollout as tensors [n_steps, num_envs, ...], the observation to
    continue from, and the (return, length) of each episode that ended.
    """
    low, high = envs.single_action_space.low, envs.single_action_space.high
    steps, episodes = [], []
    for _ in range(n_steps):
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean = actor(obs_norm(obs_t))
        action = mean + action_std * torch.randn_like(mean)
        # The buffer keeps the sampled action, whose density under mu is what
        # the actor regresses on; the environment gets it clipped to its bounds.
        next_obs, reward, terminated, truncated, info = envs.step(np.clip(action.cpu().numpy(), low, high))
        episode_end = terminated | truncated
        true_next = next_obs.copy()
        for i in np.flatnonzero(episode_end):
            true_next[i] = info["final_obs"][i]
            episodes.append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i])))
        steps.append((obs_t, action, mean, reward, terminated, episode_end, true_next))
        obs = next_obs
    names = ("obs", "action", "mu_mean", "reward", "terminated", "episode_end", "next_obs")
    rollout = {k: torch.stack([torch.as_tensor(s[i], device=device) for s in steps])
               for i, k in enumerate(names)}
    for k in ("reward", "next_obs"):
        rollout[k] = rollout[k].float()
    rollout["mu_std"] = torch.full_like(rollout["mu_mean"], action_std)
    # mu at s', from the same policy and normaliser that acted in this rollout.
    rollout["next_mu_mean"] = actor(obs_norm(rollout["next_obs"]))
    return rollout, obs, episodes


@torch.no_grad()
def evaluate(env_id: str, n_episodes: int, actor, obs_norm, device, seed: int,
             video_folder: Optional[str] = None, action_std: float = 0.0) -> np.ndarray:
    """Returns of n_episodes of the deterministic policy (the clipped mean action),
    or with action_std > 0 of the sampled Gaussian policy (the paper does not
    say which of the two its tables report)."""
    envs = make_vec_env(env_id, n_episodes, video_folder)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=seed)
    returns = np.full(n_episodes, np.nan)
    while np.isnan(returns).any():
        action = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device)))
        action = action + action_std * torch.randn_like(action)
        obs, _, _, _, info = envs.step(np.clip(action.cpu().numpy(), low, high))
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


def policy_episodes(env_id: str, n: int, actor, obs_norm, action_std: float, device, seed: int) -> list:
    """One episode in each of n environments, acting with the Gaussian policy."""
    envs = make_vec_env(env_id, n)
    obs, _ = envs.reset(seed=seed)
    horizon = gym.spec(env_id).max_episode_steps or 1000  # every env ends an episode by then
    rollout, _, _ = collect(envs, obs, horizon, actor, obs_norm, action_std, device)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    envs.close()
    return [episodes_of([{k: v[:, e : e + 1] for k, v in rollout.items()}], low, high)[0] for e in range(n)]


def train_critic(args: Args, buffer: ReplayBuffer, critic, target, critic_opt, obs_norm, bounds) -> dict:
    """Algorithm 2 lines 6-15, with the multi-step targets of Appendix 6.4."""
    low, high = bounds
    sums = torch.zeros(3, device=buffer.device)
    for i in range(args.critic_steps):
        if i % args.target_update_every == 0:
            target.load_state_dict(critic.state_dict())
        b = buffer.sample(args.batch_size, args.n_steps)
        with torch.no_grad():
            # k actions a' ~ mu(.|s') at each of the T next states: [B, T, k, act_dim].
            noise = torch.randn(b["next_mu_mean"].shape[:2] + (args.n_samples,) + b["next_mu_mean"].shape[2:],
                                device=buffer.device)
            next_actions = b["next_mu_mean"].unsqueeze(-2) + b["mu_std"].unsqueeze(-2) * noise
            next_q = target(obs_norm(b["next_obs"]), next_actions.clamp(low, high))
            bootstrap = backup_values(next_q, args.backup, args.tau, args.backup_scale)
            y = td_lambda_targets(b["reward"], bootstrap, b["terminated"], b["last"], args.gamma, args.td_lambda)
        # Q sees the action the environment executed (the clipped one).
        q = critic(obs_norm(b["obs"][:, 0]), b["action"][:, :1].clamp(low, high)).squeeze(-1)
        # Regression in the network's own units (returns times 1 - gamma).
        loss = ((q - y) / critic.out_scale).pow(2).mean()
        critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        critic_opt.step()
        sums += torch.stack([loss.detach(), q.detach().mean(), y.mean()])
    loss, q_mean, y_mean = (sums / max(1, args.critic_steps)).tolist()
    return {"critic_loss": loss, "q_mean": q_mean, "target_mean": y_mean}


def train_actor(args: Args, buffer: ReplayBuffer, actor, critic, actor_opt, obs_norm, bounds) -> dict:
    """Algorithm 2 lines 16-22: weighted regression on k actions from the stored mu."""
    low, high = bounds
    sums = torch.zeros(5, device=buffer.device)
    for _ in range(args.actor_steps):
        b = buffer.sample(args.batch_size, 1)
        obs, mu_mean, mu_std = obs_norm(b["obs"][:, 0]), b["mu_mean"][:, 0], b["mu_std"][:, 0]
        noise = torch.randn((args.batch_size, args.n_samples) + mu_mean.shape[1:], device=buffer.device)
        actions = mu_mean.unsqueeze(1) + mu_std.unsqueeze(1) * noise  # [B, k, act_dim]
        with torch.no_grad():
            q = critic(obs, actions.clamp(low, high))
            weights = advantage_weights(q, args.beta, args.max_weight)
        mean = actor(obs)
        log_prob = torch.distributions.Normal(mean.unsqueeze(1), args.action_std).log_prob(actions).sum(-1)
        loss = -(weights * log_prob).mean()
        actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        actor_opt.step()
        # Diagnostics: clipped weights; policy means at or past the action bounds; how much Q
        # and the weights vary over the k actions of one state (std over k, averaged over states).
        at_bound = ((mean.detach() <= low) | (mean.detach() >= high)).float().mean()
        sums += torch.stack([loss.detach(), (weights >= args.max_weight).float().mean(), at_bound,
                             q.std(-1, correction=0).mean(), weights.std(-1, correction=0).mean()])
    names = ("actor_loss", "clipped_weight_fraction", "mean_at_bound_fraction", "q_spread", "weight_spread")
    return dict(zip(names, (sums / max(1, args.actor_steps)).tolist()))


def train(args: Args) -> dict:
    """Runs QWR and returns the final metrics (see the dict at the end)."""
    offline, refs = None, None
    if args.offline_dataset_id:
        check_dataset_args(args)
        offline, env_id, refs = load_dataset(args.offline_dataset_id, args.action_std, "cpu")
        args = replace(args, env_id=env_id)  # evaluate where the data came from
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.capture_video and sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # render without a screen
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    envs = make_vec_env(args.env_id, args.num_envs)
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    bounds = tuple(torch.as_tensor(b, dtype=torch.float32, device=device)
                   for b in (envs.single_action_space.low, envs.single_action_space.high))
    obs_norm = ObsNormalizer(obs_dim, args.obs_norm_sample_limit).to(device)
    actor = Actor(obs_dim, act_dim).to(device)
    critic = QNetwork(obs_dim, act_dim, 1 / (1 - args.gamma) if args.scale_value_targets else 1.0,
                      args.critic_head).to(device)
    target = copy.deepcopy(critic).requires_grad_(False)
    # eps=1e-5 is the default of the authors' (Trax) Adam.
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    if offline is None:
        buffer = ReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, obs_dim, act_dim, device)
    else:  # the whole dataset, normalised by its own statistics
        buffer = offline
        buffer.data = {k: v.to(device) for k, v in buffer.data.items()}
        buffer.device = device
        obs_norm.update(buffer.data["obs"])
    state = dict(actor=actor, obs_norm=obs_norm, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt)

    start_iteration = 0
    if args.checkpoint_path:
        ckpt = torch.load(args.checkpoint_path, map_location=device)
        if ckpt["args"]["env_id"] != args.env_id:
            raise UsageError(f"the checkpoint was trained on {ckpt['args']['env_id']}, not {args.env_id}")
        for k in ("actor", "obs_norm") if args.eval_only else state:
            state[k].load_state_dict(ckpt[k])
        if not args.eval_only and offline is None:
            if ckpt["buffer"]["obs"].shape != buffer.data["obs"].shape:
                raise UsageError("resume with the checkpoint's --buffer-size and --num-envs")
            buffer.data, buffer.ptr, buffer.size = ckpt["buffer"], ckpt["buffer_ptr"], ckpt["buffer_size"]
            # The environments restart, so the stored episode in progress ends here.
            buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True
        if not args.eval_only:
            start_iteration = ckpt["iteration"]
            # The same run goes on: its log directory, and the random streams where they stopped.
            run_name = ckpt.get("run_name", run_name)
            if "rng" in ckpt:
                random.setstate(ckpt["rng"]["python"])
                np.random.set_state((ckpt["rng"]["numpy"][0], np.array(ckpt["rng"]["numpy"][1], np.uint32),
                                     *ckpt["rng"]["numpy"][2:]))
                torch.set_rng_state(ckpt["rng"]["torch"])
    if args.eval_only:
        returns = evaluate(args.env_id, args.eval_episodes, actor, obs_norm, device, args.seed + 10_000,
                           f"videos/{run_name}" if args.capture_video else None)
        print(f"eval return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes")
        return {"eval_return": float(returns.mean()), "eval_returns": returns.tolist()}

    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    n_iterations = args.offline_iterations if offline else args.total_timesteps // args.steps_per_iteration
    metrics: dict = {"eval_return": float("nan")}
    source = f"on {args.env_id}"
    if offline:  # every dataset episode ends with episode_end, so this is the mean episode return
        metrics["dataset_return"] = (buffer.data["reward"].sum() / buffer.data["episode_end"].sum()).item()
        writer.add_scalar("charts/dataset_return", metrics["dataset_return"], 0)
        source = (f"offline from {args.offline_dataset_id} ({buffer.size} steps, "
                  f"mean return {metrics['dataset_return']:.1f})")
    print(f"QWR-{args.backup} {source} ({device}), {n_iterations} iterations, logs in runs/{run_name}")
    # A resumed run restarts its episodes; a new seed keeps them from repeating the first iteration's.
    obs, _ = envs.reset(seed=args.seed + start_iteration)
    envs.action_space.seed(args.seed)
    start_time = time.time()
    start_step = start_iteration if offline else start_iteration * args.steps_per_iteration
    collected = []  # every rollout, for --save-dataset
    for iteration in range(start_iteration, n_iterations):
        iteration_start = time.time()
        episodes = []
        if offline is None:
            rollout, obs, episodes = collect(envs, obs, args.steps_per_iteration // args.num_envs, actor, obs_norm,
                                             args.action_std, device)
            obs_norm.update(rollout["obs"])
            buffer.add(rollout)
            if args.save_dataset:
                collected.append({k: v.cpu() for k, v in rollout.items()})
        # Offline, the x-axis counts iterations: no environment steps are taken.
        global_step = iteration + 1 if offline else (iteration + 1) * args.steps_per_iteration
        for ret, length in episodes:
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/episodic_length", length, global_step)

        metrics.update(train_critic(args, buffer, critic, target, critic_opt, obs_norm, bounds))
        metrics.update(train_actor(args, buffer, actor, critic, actor_opt, obs_norm, bounds))
        if not all(math.isfinite(metrics[k]) for k in ("critic_loss", "actor_loss", "q_mean")):
            raise FloatingPointError(f"non-finite losses at iteration {iteration + 1}: {metrics}")

        sps = 0 if offline else int((global_step - start_step) / (time.time() - start_time))
        metrics.update(global_step=global_step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
        for k in ("critic_loss", "actor_loss", "q_mean", "target_mean", "clipped_weight_fraction"):
            writer.add_scalar(f"losses/{k}", metrics[k], global_step)
        for k in ("mean_at_bound_fraction", "q_spread", "weight_spread"):
            writer.add_scalar(f"diagnostics/{k}", metrics[k], global_step)
        if not offline:
            writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/seconds_per_iteration", metrics["seconds_per_iteration"], global_step)

        line = f"iter {iteration + 1}/{n_iterations}" + ("" if offline else f" step {global_step}")
        if episodes:
            line += f" | train return {metrics['episodic_return']:.1f}"
        if ((iteration + 1) % args.eval_every == 0 or iteration + 1 == n_iterations) and args.eval_episodes > 0:
            video = f"videos/{run_name}/step{global_step}" if args.capture_video else None
            returns = evaluate(args.env_id, args.eval_episodes, actor, obs_norm, device, args.seed + 10_000, video)
            metrics["eval_return"] = float(returns.mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], global_step)
            line += f" | eval return {metrics['eval_return']:.1f}"
            sampled = evaluate(args.env_id, args.eval_episodes, actor, obs_norm, device, args.seed + 10_000,
                               action_std=args.action_std)
            metrics["eval_return_sampled"] = float(sampled.mean())
            writer.add_scalar("charts/eval_return_sampled", metrics["eval_return_sampled"], global_step)
            line += f" (sampled {metrics['eval_return_sampled']:.1f})"
            if offline and refs:  # D4RL's normalised score: 0 random, 100 expert
                metrics["normalized_score"] = 100 * (metrics["eval_return"] - refs[0]) / (refs[1] - refs[0])
                writer.add_scalar("charts/normalized_score", metrics["normalized_score"], global_step)
                line += f" (score {metrics['normalized_score']:.1f})"
            if args.save_model:
                path = f"runs/{run_name}/{args.exp_name}.pt"
                np_state = np.random.get_state()
                rng = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
                           torch=torch.get_rng_state())
                # Written to a temporary file first: a run killed mid-write leaves the last good checkpoint.
                torch.save({k: v.state_dict() for k, v in state.items()} | dict(  # (offline: the data is the dataset)
                    args=asdict(args), iteration=iteration + 1, buffer=None if offline else buffer.data,
                    buffer_ptr=buffer.ptr, buffer_size=buffer.size, run_name=run_name, rng=rng), path + ".tmp")
                os.replace(path + ".tmp", path)
                metrics["checkpoint"] = path
        speed = ("" if offline else f"{sps} SPS, ") + f"{metrics['seconds_per_iteration']:.1f} s/iter"
        print(line + f" | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | {speed}", flush=True)

    envs.close()
    writer.close()
    if args.save_dataset:
        low, high = envs.single_action_space.low, envs.single_action_space.high
        write_dataset(args.save_dataset, episodes_of(collected, low, high), args.env_id,
                      f"every step of {args.total_timesteps} collected by qwr_continuous.py (seed {args.seed})")
    if args.save_policy_dataset:
        write_dataset(args.save_policy_dataset,
                      policy_episodes(args.env_id, args.policy_dataset_episodes, actor, obs_norm, args.action_std,
                                      device, args.seed + 20_000), args.env_id,
                      f"episodes of QWR's Gaussian policy (std {args.action_std}) after {run_name}")
    if start_iteration >= n_iterations:  # e.g. a finished checkpoint, loaded to write --save-policy-dataset
        print(f"nothing left to train: the checkpoint is at iteration {start_iteration} of {n_iterations}")
    else:
        print(f"done: eval return {metrics['eval_return']:.1f} at {'iteration' if offline else 'step'} "
              f"{metrics.get('global_step', start_step)}, {(time.time() - start_time) / 60:.1f} min")
    return metrics | {"run_name": run_name}


if __name__ == "__main__":
    try:
        train(tyro.cli(Args))
    except UsageError as e:
        sys.exit(f"error: {e}")
