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
    """torch.compile the gradient step (eager where this machine cannot compile)"""
    cudagraphs: bool = True
    """with --compile on CUDA: replay each gradient step from CUDA graphs (compile's "reduce-overhead" mode)"""
    env_id: str = "HalfCheetah-v4"
    """gymnasium id of an environment with a continuous (Box) action space"""
    total_timesteps: int = 1_000_000
    """environment steps in total (the paper trains for 20M)"""

    # IQ (Eq. 2, Section 6)
    alpha: float = 0.9
    """weight of the Munchausen term alpha tau ln pi_bar: 0 is IQ, 0.9 is M-IQ (the paper's best)"""
    tau: float = 0.01
    """temperature tau of Q = tau ln pi + V (the paper's value on MuJoCo)"""
    munchausen_clip: float = -1.0
    """lower clip of tau ln pi_bar(a|s) in the target, as Munchausen-DQN does (l0 = -1); -inf: none (Eq. 2)"""
    policy: Literal["multicategorical", "gaussian"] = "multicategorical"
    """policy class: n bins per action dimension (the paper), or the Gaussian of the ablation (Fig. 2)"""
    n_bins: int = 11
    """bins per action dimension, actions at the bin centres (the paper's n = 11)"""
    residual: bool = False
    """use the online V(s') in the target, gradients through it: Trust-PCL (PCL with --alpha 0), the ablation
    of Fig. 2, which used --tau 1e-4 for both (iq.md, Baselines)"""

    # SAC's schedule and hyper-parameters (Haarnoja et al. 2018b, as the paper keeps them)
    gamma: float = 0.99
    """discount factor"""
    learning_rate: float = 3e-4
    """Adam learning rate of both networks (the paper lowers it for Walker and Humanoid, without the value)"""
    batch_size: int = 256
    """transitions per gradient step"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in transitions"""
    polyak: float = 0.005
    """target networks move this fraction towards the online ones after each step (lambda in Section 6)"""
    learning_starts: int = 5_000
    """uniformly random actions for this many steps before learning (the paper does not say how many)"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10_000
    """evaluate the deterministic policy (the most likely bin of each dimension) every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    capture_video: bool = False
    """record the first episode of each evaluation to videos/"""
    save_model: bool = False
    """write a checkpoint (networks, targets, optimiser, replay buffer, random state) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, in the same run directory, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""


SCRIPT = "iq_continuous.py"
# Flags that can break the numbers: a non-finite loss names those set away from their defaults.
SENSITIVE = ("learning_rate", "tau", "alpha", "munchausen_clip", "gamma", "polyak", "policy", "residual")


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


class Stop:
    """From the command line, SIGINT (Ctrl-C) or SIGTERM sets Stop.signal: training stops at the next
    safe point (after the current environment step and its gradient step), writes a checkpoint and
    says how to resume. A second signal stops the process at once."""

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
# The IQ loss, Eq. (2): Q(s, a) = tau ln pi(a|s) + V(s) is never a network
# ----------------------------------------------------------------------------


def iq_loss(
    policy, value, target_policy, target_value, batch: dict,
    *, tau: float, alpha: float, gamma: float, clip: float, residual: bool = False,
) -> torch.Tensor:
    """Mean over the batch of Eq. (2):
        ( r + alpha max(tau ln pi_bar(a|s), clip) + gamma (1 - terminated) V_bar(s')
          - tau ln pi(a|s) - V(s) )^2.
    The Munchausen term tau ln pi_bar is clipped below at `clip` as
    Munchausen-DQN does: ln pi_bar -> -inf for an action the target policy
    deems impossible would otherwise swamp the reward. Munchausen-DQN also
    clips it above at 0, a no-op for a probability (the multicategorical
    policy: ln pi <= 0), but not for the Gaussian's log-DENSITY, which is
    positive once the std is small (per dimension E ln pi = -ln sigma - 1.42 > 0
    for sigma < 0.24): that clip would zero the term for on-policy actions and
    the run would not be M-IQ. Eq. (2) has no clip at all, so there is no upper
    one here, for either policy. A truncated episode bootstraps from the
    final observation (terminated is False there). With residual=True the
    online V(s') replaces V_bar(s') and gradients flow through it (Trust-PCL).
    """
    obs, next_obs = batch["obs"], batch["next_obs"]
    with torch.no_grad():
        munchausen = (tau * target_policy.log_prob(obs, batch["action"])).clamp(min=clip)
        next_v = None if residual else target_value(next_obs).squeeze(-1)
    if residual:
        next_v = value(next_obs).squeeze(-1)
    target = batch["reward"] + alpha * munchausen + gamma * (~batch["terminated"]) * next_v
    implicit_q = tau * policy.log_prob(obs, batch["action"]) + value(obs).squeeze(-1)
    return (target - implicit_q).pow(2).mean()


# ----------------------------------------------------------------------------
# Environment, replay buffer, networks (tau ln pi(a|s) is half of the implicit Q-value)
# ----------------------------------------------------------------------------


def make_env(env_id: str, video_folder: Optional[str] = None) -> gym.Env:
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: ep == 0, disable_logger=True)
    return gym.wrappers.RecordEpisodeStatistics(env)


class ReplayBuffer:
    """A FIFO of transitions (s, a, r, s', terminated) on the device. s' is the
    true next observation, the final one when a time limit ended the episode;
    the reset observation never enters as a next state."""

    def __init__(self, capacity: int, obs_dim: int, action_shape: tuple, action_dtype, device):
        self.capacity, self.device, self.ptr, self.size = capacity, device, 0, 0
        self.data = dict(
            obs=torch.zeros((capacity, obs_dim), device=device),
            action=torch.zeros((capacity,) + action_shape, dtype=action_dtype, device=device),
            reward=torch.zeros(capacity, device=device),
            next_obs=torch.zeros((capacity, obs_dim), device=device),
            terminated=torch.zeros(capacity, dtype=torch.bool, device=device),
        )

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
    """pi(a|s) = prod_j softmax(F_j(s))(a_j) (Section 4): one shared torso,
    d x n logits. Actions are bin indices [..., d]; bin i of dimension j is
    executed as the bin centre low_j + i (high_j - low_j) / (n - 1)."""

    def __init__(self, obs_dim: int, act_dim: int, n_bins: int):
        super().__init__()
        self.act_dim, self.n_bins = act_dim, n_bins
        self.net = mlp(obs_dim, act_dim * n_bins)

    def log_probs(self, obs: torch.Tensor) -> torch.Tensor:
        """ln pi_j(.|s) of every bin: [..., d, n]."""
        logits = self.net(obs).unflatten(-1, (self.act_dim, self.n_bins))
        return torch.log_softmax(logits, -1)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """ln pi(a|s), the sum over dimensions of the chosen bins' log-probabilities."""
        return self.log_probs(obs).gather(-1, action.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        logp = self.log_probs(obs)
        if deterministic:
            return logp.argmax(-1)
        # Gumbel-max: argmax(ln pi + Gumbel noise) is a sample of pi. Unlike torch's Categorical it gives an
        # index even when a diverged run's pi is NaN, so that the run reaches the loss check and its error.
        return (logp - torch.log(-torch.log(torch.rand_like(logp)))).argmax(-1)


class GaussianPolicy(nn.Module):
    """The ablation: a diagonal Gaussian with state-dependent mean and std
    (SAC's parametrisation without the tanh squashing), acting on the raw
    action; the environment gets it clipped to its bounds."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean, log_std = self.net(obs).chunk(2, -1)
        # SAC's log-std range; no validation, so that a diverged (NaN) policy reaches the loss check.
        return torch.distributions.Normal(mean, log_std.clamp(-5.0, 2.0).exp(), validate_args=False)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).log_prob(action).sum(-1)

    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        d = self.dist(obs)
        # mean + std * noise, written out: a diverged policy's sample is NaN, not an error
        return d.mean if deterministic else d.mean + d.stddev * torch.randn_like(d.mean)


@dataclass
class Learner:
    """What IQ learns, pi and V, their targets (pi_bar, V_bar) and the one optimiser:
    built, saved and loaded as one."""

    policy: nn.Module
    value: nn.Sequential
    target_policy: nn.Module
    target_value: nn.Sequential
    optimizer: torch.optim.Optimizer

    SAVED = ("policy", "value", "target_policy", "target_value", "optimizer")


def make_learner(args: Args, obs_dim: int, act_dim: int, device) -> Learner:
    if args.policy == "multicategorical":
        policy = MultiCategoricalPolicy(obs_dim, act_dim, args.n_bins).to(device)
    else:
        policy = GaussianPolicy(obs_dim, act_dim).to(device)
    value = mlp(obs_dim, 1).to(device)
    # One loss, one optimiser over both networks.
    optimizer = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=args.learning_rate)
    return Learner(policy, value, copy.deepcopy(policy).requires_grad_(False),
                   copy.deepcopy(value).requires_grad_(False), optimizer)


# ----------------------------------------------------------------------------
# Acting: actions for the environment, evaluation
# ----------------------------------------------------------------------------


def to_env_action(action: torch.Tensor, policy: str, low: np.ndarray, high: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin indices -> bin centres, or a Gaussian sample clipped to the bounds."""
    a = action.cpu().numpy()
    if policy == "multicategorical":
        return low + a * (high - low) / (n_bins - 1)
    return np.clip(a, low, high)


@torch.no_grad()
def choose_action(args: Args, policy, env: gym.Env, obs: np.ndarray, warm_up: bool, device) -> torch.Tensor:
    """A sample of pi(.|s); during the warm-up a uniformly random action: random bins,
    or uniform over the bounds."""
    if not warm_up:
        return policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))
    if args.policy == "multicategorical":
        return torch.randint(0, args.n_bins, env.action_space.shape)
    return torch.as_tensor(env.action_space.sample())


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
            obs, _, terminated, truncated, info = env.step(to_env_action(a, args.policy, low, high, args.n_bins))
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    return np.array(returns)


# ----------------------------------------------------------------------------
# The update: one Adam step on Eq. (2), then the targets follow
# ----------------------------------------------------------------------------


def update(args: Args, learner: Learner, batch: dict) -> torch.Tensor:
    """Section 6: one Adam step on L_IQ (Eq. 2) for pi and V together, then the
    targets move a fraction lambda = --polyak towards them. Returns the loss."""
    loss = iq_loss(learner.policy, learner.value, learner.target_policy, learner.target_value, batch,
                   tau=args.tau, alpha=args.alpha, gamma=args.gamma, clip=args.munchausen_clip, residual=args.residual)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    with torch.no_grad():  # theta_bar <- (1 - lambda) theta_bar + lambda theta, and the same for phi
        for net, target in ((learner.policy, learner.target_policy), (learner.value, learner.target_value)):
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.lerp_(p, args.polyak)
    return loss.detach()


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


def check_args(args: Args) -> None:
    """Raise UsageError for a bad command line, before anything is built."""
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {args.env_id!r}: {e}") from None
    act, obs = env.action_space, env.observation_space
    env.close()
    if not isinstance(act, gym.spaces.Box):
        raise UsageError(f"iq_continuous.py needs a continuous (Box) action space, but {args.env_id} has {act}")
    if not np.all(np.isfinite(act.low)) or not np.all(np.isfinite(act.high)):
        raise UsageError(f"{args.env_id}'s action space has infinite bounds: {act}")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise UsageError(f"iq_continuous.py needs flat vector observations, {args.env_id} has {obs}")
    problems = [
        (not 0 <= args.alpha <= 1, "--alpha must be in [0, 1]"),
        (args.tau <= 0, "--tau must be > 0"),
        (args.munchausen_clip > 0, "--munchausen-clip must be <= 0"),
        (args.n_bins < 2, "--n-bins must be >= 2"),
        (not 0 < args.gamma < 1, "--gamma must be in (0, 1)"),
        (not 0 < args.polyak <= 1, "--polyak must be in (0, 1]"),
        (min(args.batch_size, args.buffer_size, args.total_timesteps, args.eval_every) < 1,
         "--batch-size, --buffer-size, --total-timesteps and --eval-every must be >= 1"),
        (args.learning_rate <= 0, "--learning-rate must be > 0"),
        (args.learning_starts < args.batch_size, "--learning-starts must be >= --batch-size"),
        (args.eval_episodes < 0, "--eval-episodes cannot be negative"),
        (args.eval_only and not args.checkpoint_path, "--eval-only needs --checkpoint-path"),
        (args.checkpoint_path and not os.path.isfile(args.checkpoint_path),
         f"checkpoint not found: {args.checkpoint_path}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def method_name(args: Args) -> str:
    """IQ (alpha = 0) or M-IQ, "-gaussian" for the ablation's policy; residual: PCL or Trust-PCL (Fig. 2)."""
    if args.residual:
        return "Trust-PCL" if args.alpha > 0 else "PCL"
    return ("IQ" if args.alpha == 0 else "M-IQ") + ("-gaussian" if args.policy == "gaussian" else "")


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
    if ckpt["args"]["policy"] != args.policy:
        raise UsageError(f"{path} was trained with a {ckpt['args']['policy']} policy, not {args.policy}")
    for k in ("policy",) if args.eval_only else Learner.SAVED:
        try:
            getattr(learner, k).load_state_dict(ckpt[k])
        except (RuntimeError, ValueError, KeyError) as e:  # another number of bins or network size
            raise UsageError(f"{path}: its {k} does not fit this run's ({str(e).strip().splitlines()[-1][:160]})")
    if args.eval_only:
        return 0, ckpt.get("run_name")
    if ckpt["buffer"]["obs"].shape != buffer.data["obs"].shape:
        raise UsageError(f"{path}: resume with the checkpoint's --buffer-size {ckpt['args']['buffer_size']}")
    buffer.data, buffer.ptr, buffer.size = ckpt["buffer"], ckpt["buffer_ptr"], ckpt["buffer_size"]
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


def end_of_window(args: Args, writer, learner: Learner, buffer: ReplayBuffer, metrics: dict, losses: list,
                  run_name: str) -> str:
    """Every --eval-every steps: log the window's mean loss and the speed, evaluate the
    deterministic policy and write a checkpoint if asked. Returns the status line."""
    step = metrics["global_step"]
    if losses:  # none during the random warm-up
        metrics["loss"] = torch.stack(losses).mean().item()
        if not math.isfinite(metrics["loss"]):
            changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SENSITIVE
                       if getattr(args, k) != getattr(Args(), k)]
            raise FloatingPointError(f"non-finite IQ loss at step {step} ({metrics['loss']}); likely cause: "
                                     f"{', '.join(changed) or 'none of the flags'}")
        writer.add_scalar("losses/iq_loss", metrics["loss"], step)
    writer.add_scalar("charts/SPS", metrics["sps"], step)
    line = f"step {step}/{args.total_timesteps}"
    if "episodic_return" in metrics:
        line += f" | train return {metrics['episodic_return']:.1f}"
    if args.eval_episodes > 0:
        video = f"videos/{run_name}/step{step}" if args.capture_video else None
        metrics["eval_return"] = float(evaluate(args, learner.policy, buffer.device, video).mean())
        writer.add_scalar("charts/eval_return", metrics["eval_return"], step)
        line += f" | eval return {metrics['eval_return']:.1f}"
    if args.save_model:
        metrics["checkpoint"] = save_checkpoint(args, learner, buffer, run_name, step)
    return line + (f" | loss {metrics['loss']:.4f}" if math.isfinite(metrics["loss"]) else " | random warm-up")


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def train(args: Args) -> dict:
    """IQ / M-IQ on SAC's schedule (Section 6): one step in the env, one update; returns the final metrics."""
    check_args(args)
    device = seed_and_device(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    env = make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    learner = make_learner(args, obs_dim, act_dim, device)
    action_dtype = torch.long if args.policy == "multicategorical" else torch.float32  # bin indices, or actions
    buffer = ReplayBuffer(args.buffer_size, obs_dim, (act_dim,), action_dtype, device)
    global_step = 0
    if args.checkpoint_path:  # the same run goes on: its log directory, step counter and random state
        global_step, saved_name = load_checkpoint(args, learner, buffer)
        run_name = saved_name or run_name
    if args.eval_only:  # evaluate the checkpoint's policy, nothing else
        eval_returns = evaluate(args, learner.policy, device, f"videos/{run_name}" if args.capture_video else None)
        print(f"eval return {eval_returns.mean():.1f} +- {eval_returns.std():.1f} over {len(eval_returns)} episodes")
        return {"eval_return": float(eval_returns.mean()), "eval_returns": eval_returns.tolist()}
    writer = open_writer(args, run_name)
    update_step = compiled(update, args, device)
    print(f"{method_name(args)} on {args.env_id} ({device}), {args.total_timesteps} steps, logs in runs/{run_name}")
    # A resumed run starts a new episode; a new seed keeps it from repeating the run's first.
    obs, _ = env.reset(seed=args.seed + global_step)
    env.action_space.seed(args.seed + global_step)
    start_time, start_step, window_start = time.time(), global_step, time.time()
    metrics: dict = {"eval_return": float("nan"), "loss": float("nan")}
    losses = []
    while global_step < args.total_timesteps:
        # Section 6: act with pi and store the transition in the FIFO replay buffer.
        action = choose_action(args, learner.policy, env, obs, global_step < args.learning_starts, device)
        next_obs, reward, terminated, truncated, info = env.step(
            to_env_action(action, args.policy, low, high, args.n_bins))
        # next_obs is the true last observation when the episode ends (no autoreset here).
        buffer.add(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated)
        obs = next_obs
        global_step += 1
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            metrics["episodic_return"] = float(info["episode"]["r"])
            obs, _ = env.reset()
        if global_step >= args.learning_starts:  # Section 6: an update at each interaction
            losses.append(update_step(args, learner, buffer.sample(args.batch_size)))
        if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
            metrics.update(global_step=global_step, sps=int((global_step - start_step) / (time.time() - start_time)))
            line = end_of_window(args, writer, learner, buffer, metrics, losses, run_name)
            losses = []
            print(f"{line} | {metrics['sps']} SPS ({(time.time() - window_start) / 60:.1f} min since the last line)",
                  flush=True)
            window_start = time.time()
        # The safe point: the step's transition is stored and its update done. A window stopped part-way
        # is logged by the resumed run, its mean loss over the updates after the resume.
        if Stop.signal:
            path = os.path.abspath(save_checkpoint(args, learner, buffer, run_name, global_step))
            print(f"stopped by {signal.Signals(Stop.signal).name} after step {global_step}, saved; resume with: "
                  f"{resume_command(args, path)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + Stop.signal)
    env.close()
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
