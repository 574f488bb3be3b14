"""Implicit Q-values (IQ) and Munchausen-IQ (M-IQ) for continuous control.

IQ (Vieillard et al., ../shared/papers/iq.md) never learns a Q-network. It
learns a policy pi and a value V and defines Q implicitly (Eq. 1):
    Q(s, a) = tau ln pi(a|s) + V(s),
so pi = softmax(Q / tau) holds exactly by construction. Both networks are
trained by ONE loss (Eq. 2), with target networks (pi_bar, V_bar):
    ( r + alpha tau ln pi_bar(a|s) + gamma V_bar(s') - tau ln pi(a|s) - V(s) )^2.
alpha = 0 is IQ; alpha > 0 (0.9, the paper's best) is M-IQ, whose extra
term adds KL regularisation the way Munchausen RL does (Section 3: IQ-DP is
Mirror-Descent VI with KL weight alpha tau and entropy weight (1-alpha) tau).
The policy is multicategorical (Section 4): each action dimension split into
n = 11 bins, dimensions independent given the state. The schedule is SAC's
(Section 6): one Adam step per environment step, Polyak-averaged targets.

    python iq_continuous.py --env-id HalfCheetah-v4
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
    seed: int = 1  # seed of python, numpy, torch and the environments
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = True  # use CUDA when it is available (the replay buffer and all updates live there)
    compile: bool = False  # torch.compile the gradient step (faster; on a CPU it needs a C++ compiler)
    env_id: str = "HalfCheetah-v4"  # gymnasium id of an environment with a bounded continuous (Box) action space
    total_timesteps: int = 1_000_000  # environment steps in total (the paper trains for 20M)
    # IQ (Eq. 2, Sections 4 and 6)
    alpha: float = 0.9  # weight of the Munchausen term alpha tau ln pi_bar: 0 is IQ, 0.9 M-IQ (the paper's best)
    tau: float = 0.01  # temperature tau of Q = tau ln pi + V (the paper's value on MuJoCo)
    munchausen_clip: float = -1.0  # lower clip of tau ln pi_bar(a|s), as Munchausen-DQN's l0; -inf: none (Eq. 2)
    # n bins per action dimension (the paper), or the Gaussian of the ablation (Fig. 2)
    policy: Literal["multicategorical", "gaussian"] = "multicategorical"
    n_bins: int = 11  # bins per action dimension, actions at the bin centres (the paper's n = 11)
    # The online V(s') in the target, gradients through it: Trust-PCL (PCL with --alpha 0), the ablation of
    # Fig. 2, which used --tau 1e-4 for both (iq.md, Baselines)
    residual: bool = False
    # SAC's schedule and hyper-parameters (Haarnoja et al. 2018b, as the paper keeps them)
    gamma: float = 0.99  # discount factor
    learning_rate: float = 3e-4  # Adam learning rate of both networks (the paper lowers it for Walker and Humanoid)
    batch_size: int = 256  # transitions per gradient step
    buffer_size: int = 1_000_000  # replay buffer capacity in transitions
    polyak: float = 0.005  # the targets move this fraction towards the online networks each step (lambda, Section 6)
    learning_starts: int = 5_000  # uniformly random actions for this many steps before learning (the paper: unsaid)
    # Evaluation, logging, checkpoints
    eval_every: int = 10_000  # evaluate the deterministic policy (each dimension's likeliest bin) every this many steps
    eval_episodes: int = 10  # episodes per evaluation
    capture_video: bool = False  # record the first episode of each evaluation to videos/
    save_model: bool = False  # write a checkpoint (networks, optimiser, replay buffer) at each evaluation
    checkpoint_path: Optional[str] = None  # checkpoint to resume from, in its run directory


# The math of IQ, as pure functions (tests/ check them against hand values)
def implicit_q(log_pi: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1: Q(s, a) = tau ln pi(a|s) + V(s). Never a network, so pi = softmax(Q / tau) exactly."""
    return tau * log_pi + v


def iq_target(reward, terminated, target_log_pi, next_v, args: Args) -> torch.Tensor:
    """The regression target of Eq. 2, r + alpha max(tau ln pi_bar(a|s), clip) + gamma (1 - terminated) V_bar(s').
    The Munchausen term is clipped below at --munchausen-clip as Munchausen-DQN does: ln pi_bar -> -inf for
    an action the target policy deems impossible would otherwise swamp the reward. Munchausen-DQN also clips
    it above at 0, a no-op for a probability (multicategorical: ln pi <= 0) but not for the Gaussian's
    log-DENSITY, positive once the std is small (per dimension E ln pi = -ln sigma - 1.42 > 0 for
    sigma < 0.24): that clip would zero the term for on-policy actions, and the run would not be M-IQ.
    Eq. 2 has no clip at all, so there is no upper one, for either policy. A truncated episode
    bootstraps from its final observation (terminated is False there)."""
    munchausen = (args.tau * target_log_pi).clamp(min=args.munchausen_clip)
    return reward + args.alpha * munchausen + args.gamma * (~terminated) * next_v


# Environment, replay buffer, networks (tau ln pi(a|s) is half of the implicit Q-value)
def make_env(env_id: str, video_folder: Optional[str] = None) -> gym.Env:
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)
    return gym.wrappers.RecordEpisodeStatistics(env)


class ReplayBuffer:
    """A FIFO of transitions (s, a, r, s', terminated) on the device. s' is the true next observation,
    the final one when a time limit ended the episode; a reset observation never enters as a next state."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, action_dtype: torch.dtype, device):
        self.capacity, self.device, self.ptr, self.size = capacity, device, 0, 0
        self.data = dict(obs=torch.zeros((capacity, obs_dim), device=device),
                         action=torch.zeros((capacity, act_dim), dtype=action_dtype, device=device),
                         reward=torch.zeros(capacity, device=device),
                         next_obs=torch.zeros((capacity, obs_dim), device=device),
                         terminated=torch.zeros(capacity, dtype=torch.bool, device=device))

    def add(self, **step) -> None:
        for k, v in step.items():
            self.data[k][self.ptr] = torch.as_tensor(v, device=self.device)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict:
        i = torch.randint(0, self.size, (batch_size,), device=self.device)
        return {k: v[i] for k, v in self.data.items()}


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """SAC's networks: two layers of 256 ReLU units."""
    return nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, out_dim))


class MultiCategoricalPolicy(nn.Module):
    """pi(a|s) = prod_j softmax(F_j(s))(a_j) (Section 4): one shared torso, d x n logits. Actions are bin
    indices [..., d]; bin i of dimension j is executed as the bin centre low_j + i (high_j - low_j) / (n - 1)."""

    def __init__(self, obs_dim: int, act_dim: int, n_bins: int):
        super().__init__()
        self.act_dim, self.n_bins = act_dim, n_bins
        self.net = mlp(obs_dim, act_dim * n_bins)

    def log_probs(self, obs: torch.Tensor) -> torch.Tensor:
        """ln pi_j(.|s) of every bin: [..., d, n]."""
        return torch.log_softmax(self.net(obs).unflatten(-1, (self.act_dim, self.n_bins)), -1)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """ln pi(a|s), the sum over dimensions of the chosen bins' log-probabilities."""
        return self.log_probs(obs).gather(-1, action.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        logp = self.log_probs(obs)
        if deterministic:
            return logp.argmax(-1)
        # Gumbel-max: argmax(ln pi + Gumbel noise) is a sample of pi. Unlike torch's Categorical it gives an
        # index even when a diverged run's pi is NaN, so that the run reaches its loss check.
        return (logp - torch.log(-torch.log(torch.rand_like(logp)))).argmax(-1)


class GaussianPolicy(nn.Module):
    """The ablation: a diagonal Gaussian with state-dependent mean and std (SAC's parametrisation without the
    tanh squashing), acting on the raw action; the environment gets it clipped to its bounds."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.net(obs).chunk(2, -1)
        # SAC's log-std range; no validation, so that a diverged (NaN) policy reaches the loss check.
        return torch.distributions.Normal(mean, log_std.clamp(-5.0, 2.0).exp(), validate_args=False)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).log_prob(action).sum(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        d = self.dist(obs)
        return d.mean if deterministic else d.mean + d.stddev * torch.randn_like(d.mean)


def make_networks(args: Args, obs_dim: int, act_dim: int) -> nn.ModuleDict:
    """What IQ learns, pi and V, and their targets pi_bar and V_bar, which start as copies of them."""
    if args.policy == "multicategorical":
        policy = MultiCategoricalPolicy(obs_dim, act_dim, args.n_bins)
    else:
        policy = GaussianPolicy(obs_dim, act_dim)
    value = mlp(obs_dim, 1)
    return nn.ModuleDict(dict(policy=policy, value=value, target_policy=copy.deepcopy(policy).requires_grad_(False),
                              target_value=copy.deepcopy(value).requires_grad_(False)))


# Acting: actions for the environment, evaluation
def to_env_action(args: Args, action: torch.Tensor, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Bin indices -> bin centres, or a Gaussian sample clipped to the bounds."""
    a = action.cpu().numpy()
    if args.policy == "multicategorical":
        return low + a * (high - low) / (args.n_bins - 1)
    return np.clip(a, low, high)


@torch.no_grad()
def evaluate(args: Args, policy, device, video_folder: Optional[str] = None) -> np.ndarray:
    """Returns of eval_episodes episodes of the deterministic policy."""
    env = make_env(args.env_id, video_folder)
    low, high = env.action_space.low, env.action_space.high
    returns = []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + episode)
        done = False
        while not done:
            a = policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device), deterministic=True)
            obs, _, terminated, truncated, info = env.step(to_env_action(args, a, low, high))
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    return np.array(returns)


# The update (Section 6): one Adam step on Eq. 2, then the targets follow
def iq_loss(args: Args, nets: nn.ModuleDict, b: dict) -> torch.Tensor:
    """Eq. 2 on a batch b of transitions (s, a, r, s', terminated), averaged: the target takes pi_bar at s
    and V_bar at s' from the target networks; the implicit Q-value (Eq. 1) is the online pi's and V's at s."""
    with torch.no_grad():
        target_log_pi = nets.target_policy.log_prob(b["obs"], b["action"])
        next_v = nets.target_value(b["next_obs"]).squeeze(-1)
    if args.residual:  # Trust-PCL: the online V(s'), gradients through it
        next_v = nets.value(b["next_obs"]).squeeze(-1)
    y = iq_target(b["reward"], b["terminated"], target_log_pi, next_v, args)
    q = implicit_q(nets.policy.log_prob(b["obs"], b["action"]), nets.value(b["obs"]).squeeze(-1), args.tau)
    return (y - q).pow(2).mean()


def update_step(args: Args, b: dict, nets: nn.ModuleDict, optimizer) -> torch.Tensor:
    """One Adam step on Eq. 2 for pi and V together, then the targets move --polyak (lambda) of the way
    towards them. Returns the loss, on the device."""
    loss = iq_loss(args, nets, b)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # theta_bar <- (1 - lambda) theta_bar + lambda theta, and the same for V's phi
        for name in ("policy", "value"):
            for p, tp in zip(nets[name].parameters(), nets["target_" + name].parameters()):
                tp.lerp_(p, args.polyak)
    return loss.detach()


def train(args: Args) -> dict:
    """IQ / M-IQ on SAC's schedule (Section 6): one environment step, one update; returns the final metrics."""
    check_env(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # render videos without a screen
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    env = make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    multicategorical = args.policy == "multicategorical"
    nets = make_networks(args, obs_dim, act_dim).to(device)
    # One loss, one optimiser over both networks.
    optimizer = torch.optim.Adam([*nets.policy.parameters(), *nets.value.parameters()], lr=args.learning_rate)
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim, torch.long if multicategorical else torch.float32,
                          device)  # bin indices, or actions
    saved = dict(nets=nets, optimizer=optimizer)
    global_step, run_name = 0, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.checkpoint_path:  # the run goes on after its last evaluation, in its own log directory
        global_step, run_name = load_checkpoint(args.checkpoint_path, saved, buffer, device)
        torch.manual_seed(args.seed + global_step)  # not the random numbers of the first steps again
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1)
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    torch._inductor.config.fallback_random = True  # compiled code draws the random numbers eager code does
    update = torch.compile(update_step) if args.compile else update_step
    method = ("M-IQ" if args.alpha > 0 else "IQ") + (" residual" if args.residual else "")
    print(f"{method} ({args.policy} policy) on {args.env_id} ({device}), {args.total_timesteps} steps, "
          f"logs in runs/{run_name}")
    # A resumed run starts a new episode; a new seed keeps it from repeating the run's first.
    obs, _ = env.reset(seed=args.seed + global_step)
    env.action_space.seed(args.seed + global_step)
    start_time, start_step, losses = time.time(), global_step, []
    metrics: dict = {"eval_return": float("nan"), "loss": float("nan")}
    while global_step < args.total_timesteps:
        # Section 6: act with pi (during the warm-up uniformly at random: random bins, or uniform over the bounds)
        # and store the transition; without autoreset, next_obs is the true last observation at an episode's end.
        if global_step < args.learning_starts:
            action = (torch.randint(0, args.n_bins, (act_dim,)) if multicategorical
                      else torch.as_tensor(env.action_space.sample()))
        else:
            action = nets.policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))
        next_obs, reward, terminated, truncated, info = env.step(to_env_action(args, action, low, high))
        buffer.add(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated)
        obs = next_obs
        global_step += 1
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            metrics["episodic_return"] = float(info["episode"]["r"])
            obs, _ = env.reset()
        if global_step >= args.learning_starts:  # Section 6: an update at each interaction
            losses.append(update(args, buffer.sample(args.batch_size), nets, optimizer))
        if global_step % args.eval_every and global_step < args.total_timesteps:
            continue
        # Every --eval-every steps: the window's mean loss (one host sync), the speed, an evaluation, a checkpoint.
        sps = int((global_step - start_step) / (time.time() - start_time))
        metrics |= dict(global_step=global_step, sps=sps)
        writer.add_scalar("charts/SPS", sps, global_step)
        line = f"step {global_step}/{args.total_timesteps}"
        if losses:  # none during the random warm-up
            metrics["loss"], losses = torch.stack(losses).mean().item(), []
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite IQ loss at step {global_step}: {metrics['loss']}")
            writer.add_scalar("losses/iq_loss", metrics["loss"], global_step)
            line += f" | loss {metrics['loss']:.4f}"
        if "episodic_return" in metrics:
            line += f" | train return {metrics['episodic_return']:.1f}"
        if args.eval_episodes > 0:
            video = f"videos/{run_name}/step{global_step}" if args.capture_video else None
            metrics["eval_return"] = float(evaluate(args, nets.policy, device, video).mean())
            writer.add_scalar("charts/eval_return", metrics["eval_return"], global_step)
            line += f" | eval return {metrics['eval_return']:.1f}"
        if args.save_model:  # a killed run resumes here, redoing at most one window of steps
            writer.flush()
            metrics["checkpoint"] = save_checkpoint(f"runs/{run_name}/{args.exp_name}.pt", saved, buffer,
                                                    global_step=global_step, run_name=run_name, args=asdict(args))
        print(f"{line} | {sps} SPS", flush=True)
    env.close()
    writer.close()
    return metrics | {"run_name": run_name}


def check_env(args: Args) -> None:
    """One line saying why this script cannot learn on the env with these flags, if it cannot."""
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make env {args.env_id!r}: {e}")
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box) or not np.isfinite(act.low).all() or not np.isfinite(act.high).all():
        raise SystemExit(f"error: iq_continuous.py needs a bounded continuous (Box) action space, "
                         f"but {args.env_id} has {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise SystemExit(f"error: iq_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    for bad, message in [(not 0 <= args.alpha <= 1, "--alpha must be in [0, 1]"),
                         (args.tau <= 0, "--tau must be > 0"),
                         (args.n_bins < 2, "--n-bins must be >= 2"),
                         (args.learning_starts < args.batch_size, "--learning-starts must be >= --batch-size")]:
        if bad:
            raise SystemExit(f"error: {message}")


def save_checkpoint(path: str, saved: dict, buffer: ReplayBuffer, **info) -> str:
    """Networks, optimiser and replay buffer, written atomically: a run killed while writing leaves the
    previous checkpoint whole."""
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
    return ckpt["global_step"], ckpt["run_name"]


if __name__ == "__main__":
    train(tyro.cli(Args))
