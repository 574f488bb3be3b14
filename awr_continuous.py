"""Advantage-Weighted Regression (AWR) for continuous control (MuJoCo).

AWR (Peng et al., ../shared/papers/awr.md, Algorithm 1; QWR paper Section 2.1, Algorithm 1
and Eq. 1) is QWR's baseline. Each iteration it
  1. collects about 2048 env steps with a Gaussian policy of fixed std into a 50K-step
     replay buffer;
  2. fits a value network V(s) to TD(lambda) returns computed over the stored trajectories
     with the previous iteration's V (200 steps, Section 3.3);
  3. fits the policy by weighted regression on the buffer's own actions,
        max E_(s,a)~D [ log pi(a|s) * min(exp(A(s, a) / beta), 20) ],
     A = R^(s,a) - V(s) normalised over the buffer (1000 steps, Eq. 10).
Where awr.md lost its numbers (OCR) they come from the authors' released code (xbpeng/awr,
awr_configs.py and learning/awr_agent.py): networks [128, 64], SGD with momentum 0.9,
per-environment actor step sizes. Comments "Alg. 1 l.N" name the lines of Algorithm 1 as
../shared/papers/qwr.md prints it (awr.md lost the algorithm box).

    python awr_continuous.py --env-id Walker2d-v4
"""

import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Optional

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
    total_timesteps: int = 100_000  # environment steps in total (QWR's Table 1 compares at 100K)
    num_envs: int = 1  # parallel environments that share the per-iteration step budget
    # Schedule (Section 5 of awr.md; the authors' awr_configs.py)
    samples_per_iteration: int = 2048  # environment steps collected per iteration
    critic_steps: int = 200  # value-network gradient steps per iteration
    actor_steps: int = 1000  # policy gradient steps per iteration
    batch_size: int = 256  # states per gradient step, for policy and value network
    buffer_size: int = 50_000  # replay buffer capacity in environment steps
    critic_lr: float = 0.01  # SGD step size of the value network
    actor_lr: Optional[float] = None  # SGD step size of the policy; default: the authors' value for the env
    momentum: float = 0.9  # SGD momentum of both networks
    # Targets and weights
    gamma: float = 0.99  # discount factor
    td_lambda: float = 0.95  # lambda of the TD(lambda) returns
    beta: float = 1.0  # temperature of the advantage weights exp(A / beta), A normalised
    max_weight: float = 20.0  # advantage weights are clipped at this value
    action_std: Optional[float] = None  # fixed std of the policy in units of half the action range; default: authors'
    action_bound_weight: float = 10.0  # weight of the penalty on policy means outside the action bounds (authors')
    obs_norm_sample_limit: int = 300_000  # observations after which the normaliser freezes (authors' code)
    # Evaluation, logging, checkpoints
    eval_every: int = 5  # evaluate the deterministic policy every this many iterations (and at the end)
    eval_episodes: int = 10  # episodes per evaluation
    capture_video: bool = False  # record the first episode of each evaluation to videos/
    save_model: bool = False  # write a checkpoint (networks, optimisers, replay buffer) after every iteration
    checkpoint_path: Optional[str] = None  # checkpoint to resume from, in its run directory


# The authors' per-environment settings (awr_configs.py): actor step size and action std; every other
# hyper-parameter is shared. Keys are gymnasium names without the version (Walker2d-v4 uses Walker2d-v2's).
AUTHORS_PER_ENV = {
    "Ant": dict(actor_lr=5e-5, action_std=0.2),
    "HalfCheetah": dict(actor_lr=5e-5, action_std=0.4),
    "Hopper": dict(actor_lr=1e-4, action_std=0.4),
    "Humanoid": dict(actor_lr=1e-5, action_std=0.4),
    "Walker2d": dict(actor_lr=2.5e-5, action_std=0.4),
}
AUTHORS_DEFAULT = dict(actor_lr=5e-5, action_std=0.2)  # the authors' AWRAgent defaults, for any other env


def authors_setting(env_id: str) -> dict:
    """The authors' actor step size and action std for env_id (see AUTHORS_PER_ENV)."""
    return AUTHORS_PER_ENV.get(env_id.split("/")[-1].split("-")[0], AUTHORS_DEFAULT)


# The math of AWR, as pure functions (tests/ check them against hand values)


def td_lambda_returns(rewards, next_values, terminated, cut, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns R_t of every stored step (awr.md Section 3.3). Inputs are [T, ...], oldest step
    first: rewards r_t, next_values V(s_{t+1}) at the true next state (also at an episode end),
    terminated_t, and cut_t (the episode ends at t, or t is the newest step stored). Within an episode
        R_t = r_t + gamma * ((1 - lam) V(s_{t+1}) + lam R_{t+1}),
    and at a cut R_t = r_t + gamma V(s_{t+1}), with V = 0 after a termination: a time-limit truncation
    bootstraps, a return never crosses an episode. As in the authors' code, V is the previous iteration's.

    The recursion is linear, R_t = a_t + c_t R_{t+1}, so it is solved for all t at once by recursive
    doubling: log2(T) vector steps instead of a Python loop over the 50K stored steps. After the pass with
    shift s, R_t = a_t + c_t R_{t+s} (R past the newest step is never needed: c = 0 at a cut)."""
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
    """Weights of the policy regression, Eq. 10 with the paper's clipping: the advantages of all stored
    steps normalised by their mean and std (std + 1e-5, as the authors' code), then
    w = min(exp(A / beta), max_weight), computed without overflow."""
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


def action_bound_loss(mean: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over states of the squared distance of the policy mean (in normalised action units,
    bounds -1 and 1) outside the bounds (the authors' penalty)."""
    return 0.5 * (mean - mean.clamp(-1.0, 1.0)).pow(2).sum(-1).mean()


# Environment, replay buffer, observation normaliser, networks


def make_env(env_id: str, video_folder: Optional[str] = None):
    def thunk():
        env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
        if video_folder:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)
        return env

    return thunk


def make_vec_env(env_id: str, n: int, video_folder: Optional[str] = None) -> gym.vector.VectorEnv:
    # SAME_STEP autoreset: every step is a real transition; at an episode end the true last observation is
    # in info["final_obs"] and the returned one starts the next episode.
    envs = gym.vector.SyncVectorEnv([make_env(env_id, video_folder if i == 0 else None) for i in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)  # info["episode"] at episode ends


class ReplayBuffer:
    """The last `capacity` steps of each env, time-major: data[name][row, env]. Every step stores
    (s, a, r, s', terminated) and whether the episode ended there; s' is the true final observation at
    an episode end, which a time-limit truncation bootstraps from."""

    def __init__(self, capacity: int, num_envs: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        shapes = dict(obs=(obs_dim,), action=(act_dim,), reward=(), terminated=(), episode_end=(),
                      next_obs=(obs_dim,))
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

    def chronological(self) -> dict:
        """All stored steps, oldest first: [size, num_envs, ...], and "cut": an episode end, or the
        newest step (whose successor is not stored yet)."""
        rows = (self.ptr - self.size + torch.arange(self.size, device=self.device)) % self.capacity
        out = {k: v[rows] for k, v in self.data.items()}
        out["cut"] = out["episode_end"].clone()
        out["cut"][-1] = True
        return out


class ObsNormalizer(nn.Module):
    """(x - mean) / std with the mean and std of every observation recorded so far, until `sample_limit`
    of them (the authors' state normaliser)."""

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
        if len(x) == 0:  # frozen
            return
        self.total += x.sum(0)
        self.total_sq += x.pow(2).sum(0)
        self.count += len(x)
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean**2).clamp(min=0)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp(min=1e-4))  # a constant feature never divides by 0


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """The authors' networks: ReLU layers of 128 and 64 units, a linear output, Xavier-uniform weights
    and zero biases (TensorFlow's dense defaults there)."""
    net = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out_dim))
    for layer in net[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


class Actor(nn.Module):
    """Mean of the Gaussian policy in normalised action units (the bounds map to -1 and 1); std fixed."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim)
        nn.init.uniform_(self.net[-1].weight, -0.01, 0.01)  # as the authors': the first policy acts near the middle

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class Critic(nn.Module):
    """V(s). The network learns V * (1 - gamma), returns in per-step units (the authors' value
    normaliser); forward gives V in return units."""

    def __init__(self, obs_dim: int, gamma: float):
        super().__init__()
        self.net, self.out_scale = mlp(obs_dim, 1), 1 / (1 - gamma)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1) * self.out_scale


# Acting: collection and evaluation


@torch.no_grad()
def collect(envs, obs: np.ndarray, n_steps: int, actor, obs_norm, action_std: float, device):
    """Alg. 1 l.5: n_steps vector steps of the Gaussian policy, as tensors [n_steps, num_envs, ...], the
    observation to continue from, and the (return, length) of each episode that ended."""
    low, high = envs.single_action_space.low, envs.single_action_space.high
    mid, half = (high + low) / 2, (high - low) / 2
    steps, episodes = [], []
    for _ in range(n_steps):
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean = actor(obs_norm(obs_t))
        action = mid + half * (mean + action_std * torch.randn_like(mean)).cpu().numpy()
        # The buffer keeps the sampled action, whose likelihood the policy regresses on; the env gets it clipped.
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
def evaluate(args: Args, actor, obs_norm, device, video_folder: Optional[str] = None) -> np.ndarray:
    """Returns of eval_episodes episodes of the deterministic policy (the clipped mean action)."""
    envs = make_vec_env(args.env_id, args.eval_episodes, video_folder)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=args.seed + 10_000)
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        mean = actor(obs_norm(torch.as_tensor(obs, dtype=torch.float32, device=device))).cpu().numpy()
        obs, _, _, _, info = envs.step(np.clip((high + low) / 2 + (high - low) / 2 * mean, low, high))
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


# The two regressions of an iteration (Alg. 1 l.6-9 and l.10-14)


@torch.no_grad()
def buffer_returns(args: Args, buffer: ReplayBuffer, critic, obs_norm) -> tuple:
    """Every stored step's state, action, V(s) and TD(lambda) return R (Section 3.3), flat over (time, env)."""
    d = buffer.chronological()
    values, next_values = (critic(obs_norm(d[k])) for k in ("obs", "next_obs"))
    returns = td_lambda_returns(d["reward"], next_values, d["terminated"], d["cut"], args.gamma, args.td_lambda)
    return tuple(x.flatten(0, 1) for x in (d["obs"], d["action"], values, returns))


def critic_step(args: Args, critic, critic_opt, obs_norm, states, returns) -> torch.Tensor:
    """Alg. 1 l.8: a step on 1/2 ||R - V(s)||^2 (the authors' factor 1/2) on fixed TD(lambda) returns, in the
    network's own units; returns the loss."""
    loss = 0.5 * ((critic(obs_norm(states)) - returns) / critic.out_scale).pow(2).mean()
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return loss.detach()


def actor_step(args: Args, actor, actor_opt, obs_norm, states, actions, weights) -> torch.Tensor:
    """Alg. 1 l.12-13 (Eq. 10): a step of weighted maximum likelihood of the stored actions (in the
    policy's units), plus the authors' action-bound penalty; returns the loss."""
    mean = actor(obs_norm(states))
    z = (actions - mean) / args.action_std  # log N(a; mean, std), written out
    log_prob = (-0.5 * z.pow(2) - math.log(args.action_std * math.sqrt(2 * math.pi))).sum(-1)
    loss = -(weights * log_prob).mean() + args.action_bound_weight * action_bound_loss(mean)
    actor_opt.zero_grad(set_to_none=True)
    loss.backward()
    actor_opt.step()
    return loss.detach()


def train(args: Args) -> dict:
    """AWR (Algorithm 1); returns the final metrics."""
    warnings.filterwarnings("ignore", message=".*is out of date")  # MuJoCo -v4, closest to the paper's gym v2
    check_env(args)
    args = replace(args, **{k: v for k, v in authors_setting(args.env_id).items() if getattr(args, k) is None})
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    os.environ.setdefault("MUJOCO_GL", "egl")  # render videos without a screen
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    envs = make_vec_env(args.env_id, args.num_envs)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = (torch.as_tensor(b, dtype=torch.float32, device=device)
                 for b in (envs.single_action_space.low, envs.single_action_space.high))
    # Alg. 1 l.1-3: random actor and critic parameters, an empty replay buffer D.
    actor, critic = Actor(obs_dim, act_dim).to(device), Critic(obs_dim, args.gamma).to(device)
    obs_norm = ObsNormalizer(obs_dim, args.obs_norm_sample_limit).to(device)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=args.actor_lr, momentum=args.momentum)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=args.critic_lr, momentum=args.momentum)
    buffer = ReplayBuffer(args.buffer_size // args.num_envs, args.num_envs, obs_dim, act_dim, device)
    saved = dict(actor=actor, critic=critic, obs_norm=obs_norm, actor_opt=actor_opt, critic_opt=critic_opt)
    global_step, run_name = 0, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.checkpoint_path:  # the run goes on after its last whole iteration, in its own log directory
        global_step, run_name = load_checkpoint(args.checkpoint_path, saved, buffer, device)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    n_iterations = math.ceil(args.total_timesteps / args.samples_per_iteration)
    print(f"AWR on {args.env_id} ({device}), {n_iterations} iterations, actor lr {args.actor_lr}, "
          f"action std {args.action_std}, logs in runs/{run_name}")
    iteration = global_step // args.samples_per_iteration
    obs, _ = envs.reset(seed=args.seed + iteration)  # a resumed run starts new episodes
    if iteration:
        torch.manual_seed(args.seed + iteration)  # not the random numbers of the first iterations again
    torch._inductor.config.fallback_random = True  # compiled code draws the random numbers eager code does
    critic_update = torch.compile(critic_step) if args.compile else critic_step
    actor_update = torch.compile(actor_step) if args.compile else actor_step
    start_time, start_step, metrics = time.time(), global_step, {"eval_return": float("nan")}
    while global_step < args.total_timesteps:  # Alg. 1 l.4
        iteration_start = time.time()
        # Alg. 1 l.5: add trajectories sampled by pi_theta to D.
        n_new = min(args.samples_per_iteration, args.total_timesteps - global_step)
        rollout, obs, episodes = collect(envs, obs, n_new // args.num_envs, actor, obs_norm, args.action_std, device)
        obs_norm.update(rollout["obs"])
        buffer.add(rollout)
        global_step, iteration = global_step + n_new, iteration + 1
        for ret, length in episodes:
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/episodic_length", length, global_step)
        # A short last iteration takes proportionally fewer steps (authors' code).
        critic_steps, actor_steps = (math.ceil(n * n_new / args.samples_per_iteration)
                                     for n in (args.critic_steps, args.actor_steps))
        # Alg. 1 l.6-9: V regresses on returns R computed with the previous iteration's V, fixed meanwhile ...
        states, _, _, returns = buffer_returns(args, buffer, critic, obs_norm)
        critic_sum = torch.zeros(1, device=device)
        for _ in range(critic_steps):
            i = torch.randint(0, len(states), (args.batch_size,), device=device)  # Alg. 1 l.7: s ~ D
            critic_sum += critic_update(args, critic, critic_opt, obs_norm, states[i], returns[i])
        # ... then the advantages use the new V, as the authors' code recomputes them.
        states, actions, values, returns = buffer_returns(args, buffer, critic, obs_norm)
        # Alg. 1 l.12: xi = exp(A / beta) with A = R - V(s), for all of D at once (normalised over it).
        weights = advantage_weights(returns - values, args.beta, args.max_weight)
        actions = (actions - (high + low) / 2) / ((high - low) / 2)  # the policy's units: bounds at -1 and 1
        actor_sum = torch.zeros(1, device=device)
        for _ in range(actor_steps):  # Alg. 1 l.10-14
            i = torch.randint(0, len(states), (args.batch_size,), device=device)  # Alg. 1 l.11: (s, a) ~ D
            actor_sum += actor_update(args, actor, actor_opt, obs_norm, states[i], actions[i], weights[i])
        metrics |= dict(critic_loss=(critic_sum / max(1, critic_steps)).item(),
                        actor_loss=(actor_sum / max(1, actor_steps)).item(), value_mean=values.mean().item(),
                        return_mean=returns.mean().item(),
                        clipped_weight_fraction=(weights >= args.max_weight).float().mean().item())
        if not math.isfinite(metrics["critic_loss"] + metrics["actor_loss"]):
            raise FloatingPointError(f"non-finite losses at step {global_step}: {metrics}")

        sps = int((global_step - start_step) / (time.time() - start_time))
        metrics |= dict(global_step=global_step, sps=sps, seconds_per_iteration=time.time() - iteration_start)
        for k in ("critic_loss", "actor_loss", "value_mean", "return_mean", "clipped_weight_fraction"):
            writer.add_scalar(f"losses/{k}", metrics[k], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/seconds_per_iteration", metrics["seconds_per_iteration"], global_step)
        line = f"iter {iteration}/{n_iterations} step {global_step}"
        if episodes:
            metrics["episodic_return"] = float(np.mean([r for r, _ in episodes]))
            line += f" | train return {metrics['episodic_return']:.1f}"
        if (iteration % args.eval_every == 0 or global_step >= args.total_timesteps) and args.eval_episodes > 0:
            video = f"videos/{run_name}/step{global_step}" if args.capture_video else None
            metrics["eval_return"] = float(evaluate(args, actor, obs_norm, device, video).mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], global_step)
            line += f" | eval return {metrics['eval_return']:.1f}"
        if args.save_model:  # at the iteration's end: a killed run resumes here, redoing at most one iteration
            writer.flush()
            metrics["checkpoint"] = save_checkpoint(f"runs/{run_name}/{args.exp_name}.pt", saved, buffer,
                                                    global_step=global_step, run_name=run_name, args=asdict(args))
        print(f"{line} | critic {metrics['critic_loss']:.4f} actor {metrics['actor_loss']:.3f} | {sps} SPS, "
              f"{metrics['seconds_per_iteration']:.1f} s/iter", flush=True)
    envs.close()
    writer.close()
    return metrics | {"run_name": run_name}


def save_checkpoint(path: str, saved: dict, buffer: ReplayBuffer, **info) -> str:
    """Networks, optimisers, normaliser and replay buffer, written atomically: a run killed while writing
    leaves the previous checkpoint whole."""
    state = {k: v.state_dict() for k, v in saved.items()} | dict(buffer=(buffer.data, buffer.ptr, buffer.size))
    torch.save(state | info, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(path: str, saved: dict, buffer: ReplayBuffer, device) -> tuple[int, str]:
    """Load a checkpoint of save_checkpoint; returns its global step and run name."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for k, module in saved.items():
        module.load_state_dict(ckpt[k])
    buffer.data, buffer.ptr, buffer.size = ckpt["buffer"]
    buffer.data["episode_end"][(buffer.ptr - 1) % buffer.capacity] = True  # the envs restart: no crossing
    return ckpt["global_step"], ckpt["run_name"]


def check_env(args: Args) -> None:
    """One line saying why this script cannot learn on the env, or with these flags; else nothing."""
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make env {args.env_id!r}: {e}")
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box) or not np.isfinite(act.low).all() or not np.isfinite(act.high).all():
        raise SystemExit(f"error: awr_continuous.py needs a bounded continuous (Box) action space, "
                         f"but {args.env_id} has {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise SystemExit(f"error: awr_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    if args.samples_per_iteration % args.num_envs or args.total_timesteps % args.num_envs:
        raise SystemExit("error: --samples-per-iteration and --total-timesteps must each be a multiple of --num-envs")
    if not 0 < args.gamma < 1:
        raise SystemExit("error: --gamma must be in (0, 1): values are learned in units of 1/(1-gamma)")


if __name__ == "__main__":
    train(tyro.cli(Args))
