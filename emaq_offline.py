"""Expected-Max Q-learning (EMaQ) from an offline dataset (Minari).

EMaQ (Ghasemipour et al., ../shared/papers/emaq.md) learns no policy network.
It first fits a behaviour model mu(a|s) to the dataset, then learns Q with
the Expected-Max operator (Eq. 5; Algorithm 1 in Appendix C)
    T^N_mu Q(s, a) = r + gamma E_s' E_{a'_1..a'_N ~ mu(.|s')} [ max_i Q(s', a'_i) ],
which stays on mu's support: N = 1 evaluates mu, N -> inf is Q-learning
restricted to mu's support (Theorems 3.1-3.5, checked in tests/). The
policy samples N actions from mu and takes the best under Q.
  - mu is autoregressive over discretised action dimensions (Appendix B):
    an MLP embeds s; per dimension i, an MLP of (embedding, a[:i]) gives the
    logits of 40 bins; a_i is drawn uniformly within the chosen bin.
  - Q is an ensemble of K = 8 networks with EMA targets; a target combines
    the members as lambda min + (1 - lambda) max (lambda = 1).
Hyper-parameters are Table 2's (MuJoCo); Table 3's (kitchen, antmaze, Adroit)
are flags (benchmarks/run.py emaq-d4rl passes them).

    python emaq_offline.py --dataset-id mujoco/hopper/medium-v0 --n-samples 10   # Minari downloads it
    python emaq_offline.py --dataset-id local/hopper/qwr-replay-v0 --no-download  # made by qwr_continuous.py
"""

import copy
import math
import os
import random
import shlex
import signal
import sys
import time
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of python, numpy, torch and the evaluation environments"""
    torch_deterministic: bool = True
    """make torch's algorithms deterministic (same seed, same numbers)"""
    cuda: bool = True
    """use CUDA when it is available (the dataset and all updates live there)"""
    compile: bool = True
    """run the gradient steps of mu and of the Q-ensemble (target and sampling included) through torch.compile
    (eager where it cannot compile)"""
    cudagraphs: bool = True
    """with --compile on CUDA: replay each gradient step from CUDA graphs (compile's "reduce-overhead" mode)"""
    dataset_id: str = "mujoco/walker2d/medium-v0"
    """Minari dataset id: a standard one (mujoco/hopper/medium-v0, D4RL/kitchen/complete-v2, ...) or one made
    with qwr_continuous.py --save-dataset (see README)"""
    download: bool = True
    """download --dataset-id with Minari when it is not in the local store ($MINARI_DATASETS_PATH)"""

    # EMaQ (Section 3, Table 2)
    n_samples: int = 10
    """N, actions drawn from mu for the backup and for acting (the paper sweeps 5 ... 400)"""
    num_q: int = 8
    """K, Q-networks in the ensemble"""
    q_hidden: int = 750
    """units in each hidden layer of every Q-network (Table 2: 750; Table 3: 256)"""
    q_layers: int = 3
    """hidden layers of every Q-network (Table 2: 3; Table 3: 4)"""
    ensemble_lambda: float = 1.0
    """a target combines the K members as lambda * min + (1 - lambda) * max"""
    num_updates: int = 1_000_000
    """Q-ensemble gradient steps"""
    q_lr: float = 1e-4
    """Adam learning rate of the Q-networks"""
    ema: float = 0.995
    """target networks: theta_target <- ema * theta_target + (1 - ema) * theta after each step"""
    batch_size: int = 256
    """transitions per gradient step (Q and mu)"""
    gamma: float = 0.99
    """discount factor"""

    # Behaviour model mu (Appendix B)
    mu_steps: int = 100_000
    """maximum-likelihood steps of mu before Q-learning (the paper trains mu first; it gives no count)"""
    mu_lr: float = 5e-4
    """Adam learning rate of mu"""
    n_bins: int = 40
    """bins per action dimension"""
    mu_embed: int = 750
    """units of mu's state-embedding MLP and of the embedding itself (Appendix G.1: 750; Table 3: 256)"""
    mu_embed_layers: int = 2
    """hidden layers of mu's state-embedding MLP (Appendix G.1: 2; Table 3: 4)"""
    mu_hidden: int = 256
    """units in each hidden layer of mu's per-dimension MLPs (Appendix G.1: 256; Table 3: 128)"""
    mu_layers: int = 3
    """hidden layers of mu's per-dimension MLPs (Appendix G.1: 3; Table 3: 1)"""

    # Evaluation, logging, checkpoints
    eval_every: int = 10_000
    """evaluate the policy (best of N actions from mu) every this many Q updates"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    save_model: bool = False
    """write a checkpoint (mu, Q-ensemble, targets, optimisers, random state) at each evaluation"""
    checkpoint_path: Optional[str] = None
    """checkpoint to load: training resumes from it, in the same run directory, or see --eval-only"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint-path, then exit"""


SCRIPT = "emaq_offline.py"
# Flags that can break the numbers: a non-finite loss names those set away from their defaults.
SENSITIVE = ("q_lr", "mu_lr", "gamma", "ema", "ensemble_lambda", "n_samples", "n_bins")


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


class Stop:
    """From the command line, SIGINT (Ctrl-C) or SIGTERM sets Stop.signal: training stops at the next
    safe point (between two gradient steps, of mu or of the Q-ensemble), writes a checkpoint and says
    how to resume. A second signal stops the process at once."""

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
# The math of EMaQ: the target (Eq. 11) and the policy (Algorithm 1)
# ----------------------------------------------------------------------------


def combine(q: torch.Tensor, lam: float) -> torch.Tensor:
    """Ensemble(values) of Algorithm 1: lambda * min + (1 - lambda) * max over dim 0."""
    return lam * q.min(0).values + (1 - lam) * q.max(0).values


@torch.no_grad()
def emaq_target(batch: dict, behavior, target_q, n_samples: int, lam: float, gamma: float) -> torch.Tensor:
    """y = r + gamma (1 - terminated) max_{i <= N} Ensemble(Q_target(s', a'_i)), a'_i ~ mu(.|s')
    (Eq. 11; y_target of Algorithm 1), with N = n_samples."""
    next_actions = behavior.sample(batch["next_obs"], n_samples)  # [B, N, d]
    B = len(next_actions)
    next_obs = batch["next_obs"].repeat_interleave(n_samples, 0)
    q = combine(target_q(next_obs, next_actions.reshape(B * n_samples, -1)), lam).view(B, n_samples)
    return batch["reward"] + gamma * (~batch["terminated"]) * q.max(-1).values


@torch.no_grad()
def act(obs: torch.Tensor, behavior, q_ensemble, n_samples: int, lam: float) -> torch.Tensor:
    """The EMaQ policy pi^N_mu (pi_test of Algorithm 1): the best of N = n_samples actions
    from mu under the ensemble."""
    actions = behavior.sample(obs, n_samples)  # [B, N, d]
    B = len(actions)
    q = combine(q_ensemble(obs.repeat_interleave(n_samples, 0), actions.reshape(B * n_samples, -1)), lam)
    return actions[torch.arange(B), q.view(B, n_samples).argmax(-1)]


# ----------------------------------------------------------------------------
# Data: a Minari dataset as flat transitions
# ----------------------------------------------------------------------------


# D4RL's random and expert returns of its MuJoCo tasks (scores 0 and 100), for datasets that carry none.
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3),
                   "Walker2d": (1.629008, 4592.3)}
MAKE_ONE = "python qwr_continuous.py --env-id Hopper-v4 --save-dataset local/hopper/replay-v0 (README: offline)"


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def open_dataset(dataset_id: str, download: bool):
    """The Minari dataset from the local store ($MINARI_DATASETS_PATH), downloaded by Minari
    (which shows its progress) when it is not there and download is on; or a one-line error
    that says how to get it."""
    try:
        import minari
    except ImportError:
        raise UsageError("emaq_offline.py reads Minari datasets: pip install 'minari[hdf5,hf]'") from None
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


def make_env(spec) -> gym.Env:
    """The evaluation environment; a Dict observation (antmaze, kitchen) is flattened in the
    order of its space, the order in which flat_obs flattens the dataset's observations."""
    env = gym.make(spec)
    return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env


def flat_obs(space: gym.Space, obs) -> np.ndarray:
    """A dataset's observations [T, ...] as flat vectors [T, n]: the parts of a Dict space
    (nested ones too) joined in the space's order, as gymnasium's FlattenObservation does."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flat_obs(sub, obs[k]) for k, sub in space.spaces.items()], -1)
    return np.asarray(obs, np.float32).reshape(len(obs), -1)


@dataclass
class DatasetInfo:
    """What evaluating against a dataset needs besides its transitions."""

    env_spec: gym.envs.registration.EnvSpec  # the environment to evaluate in
    action_space: gym.spaces.Box  # mu's bins span its bounds
    refs: Optional[tuple]  # (random, expert) returns for the normalised score, or None
    mean_return: float  # of the dataset's episodes
    discounted_return: float  # the mean over its steps of sum_k gamma^k r_(t+k) to the episode's end: what Q nears


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


def load_transitions(dataset_id: str, download: bool, device, gamma: float = 0.99) -> tuple[dict, DatasetInfo]:
    """A Minari dataset as flat transitions (s, a, r, s', terminated) on the device, and what
    evaluating against it needs; or a clear error."""
    dataset = open_dataset(dataset_id, download)
    spec = eval_env_spec(dataset, dataset_id)
    env = gym.make(spec)
    obs_space, action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise UsageError(f"emaq_offline.py needs continuous (Box) actions; {dataset_id} has {action_space}")
    parts = {k: [] for k in ("obs", "action", "reward", "next_obs", "terminated")}
    episode_returns, to_go = [], []
    for ep in dataset.iterate_episodes():
        obs = flat_obs(obs_space, ep.observations)
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])  # the true final observation ends each episode
        parts["action"].append(ep.actions)
        parts["reward"].append(ep.rewards)
        # A truncation is not terminal: it bootstraps. Booleans: a writer's 0 / 1 would make ~t -1 / -2.
        parts["terminated"].append(np.asarray(ep.terminations, bool))
        episode_returns.append(float(ep.rewards.sum()))
        g = 0.0
        for r in ep.rewards[::-1]:  # the discounted return from each step to the end of the data
            g = float(r) + gamma * g
            to_go.append(g)
    data = {k: torch.as_tensor(np.concatenate(v)).to(device) for k, v in parts.items()}
    for k in ("obs", "action", "reward", "next_obs"):
        data[k] = data[k].float()
    meta = dataset.storage.metadata
    refs = ((meta["ref_min_score"], meta["ref_max_score"]) if meta.get("ref_max_score") is not None
            else D4RL_REF_SCORES.get(spec.id.split("/")[-1].split("-")[0]))  # D4RL's, for its MuJoCo tasks
    return data, DatasetInfo(spec, action_space, refs, float(np.mean(episode_returns)), float(np.mean(to_go)))


def normalized_score(ret: float, refs: tuple) -> float:
    """D4RL's normalised score of a return: 0 is the random policy's, 100 the expert's."""
    return 100 * (ret - refs[0]) / (refs[1] - refs[0])


def with_score(ret: float, refs: Optional[tuple]) -> str:
    """A return for the status line, with its normalised score when the dataset has reference returns."""
    return f"{ret:.1f}" + (f" (score {normalized_score(ret, refs):.1f})" if refs else "")


# ----------------------------------------------------------------------------
# Networks: the autoregressive behaviour model and the Q-ensemble
# ----------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """K independent linear layers applied at once: [K, B, in] -> [K, B, out]."""

    def __init__(self, k: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default initialisation, member by member
        self.weight = nn.Parameter(torch.empty(k, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def ensemble_mlp(k: int, in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Sequential:
    mods, dim = [], in_dim
    for _ in range(layers):
        mods += [EnsembleLinear(k, dim, hidden), nn.ReLU()]
        dim = hidden
    return nn.Sequential(*mods, EnsembleLinear(k, dim, out_dim))


class QEnsemble(nn.Module):
    """K Q-networks, MLPs of ReLU units (Table 2: 3 layers of 750)."""

    def __init__(self, obs_dim: int, act_dim: int, k: int, hidden: int = 750, layers: int = 3):
        super().__init__()
        self.k, self.net = k, ensemble_mlp(k, obs_dim + act_dim, hidden, layers, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs [B, obs_dim], action [B, act_dim] -> Q [K, B]."""
        x = torch.cat([obs, action], -1).expand(self.k, -1, -1)
        return self.net(x).squeeze(-1)


class AutoregressiveBehavior(nn.Module):
    """mu(a|s) = prod_i p(l_i | s, a[:i]) * Uniform(a_i | bin l_i) (Appendix B, Eqs. 62-66).

    The state embedding is an MLP of ReLU units with a linear output of the
    same width (Appendix G.1: 2 layers of 750). Dimension i has its own MLP
    (3 layers of 256) of the embedding and the actions before i. The d MLPs
    run as one batched ensemble: each sees all actions, with a[i:] masked to
    0, which is the same function as an MLP of a[:i] alone (the masked inputs'
    weights never matter). Table 3's models also pass a[:i] through a linear
    map first; the paper says this was not needed, and it is left out here.
    """

    def __init__(self, obs_dim: int, low: np.ndarray, high: np.ndarray, n_bins: int = 40,
                 embed: int = 750, hidden: int = 256, embed_layers: int = 2, layers: int = 3):
        super().__init__()
        self.act_dim, self.n_bins = len(low), n_bins
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        mods, dim = [], obs_dim
        for _ in range(embed_layers):
            mods += [nn.Linear(dim, embed), nn.ReLU()]
            dim = embed
        self.embed = nn.Sequential(*mods, nn.Linear(dim, embed))
        self.heads = ensemble_mlp(self.act_dim, embed + self.act_dim, hidden, layers, n_bins)
        # mask[i, j] = 1 if dimension j comes before dimension i
        self.register_buffer("mask", torch.tril(torch.ones(self.act_dim, self.act_dim), -1))

    def bins(self, action: torch.Tensor) -> torch.Tensor:
        """The label of the bin of each action component (values on the edges go inside)."""
        unit = (action - self.low) / (self.high - self.low)
        return (unit * self.n_bins).long().clamp(0, self.n_bins - 1)

    def logits(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every dimension: [B, d, n_bins]."""
        h = self.embed(obs)  # [B, embed]
        inputs = torch.cat([h.expand(self.act_dim, -1, -1), action * self.mask[:, None, :]], -1)  # [d, B, .]
        return self.heads(inputs).transpose(0, 1)

    def log_prob_bins(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log prod_i p(l_i | s, a[:i]) of the bins the actions fall in: [B]."""
        logp = torch.log_softmax(self.logits(obs, action), -1)
        return logp.gather(-1, self.bins(action).unsqueeze(-1)).squeeze(-1).sum(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, n_samples: int) -> torch.Tensor:
        """n_samples actions per state, [B, n_samples, d], one dimension after the other (Eqs. 63-66)."""
        h = self.embed(obs).repeat_interleave(n_samples, 0)  # [B * n_samples, embed]
        action = torch.zeros(len(h), self.act_dim, device=h.device)
        width = (self.high - self.low) / self.n_bins
        for i in range(self.act_dim):
            x = torch.cat([h, action * self.mask[i]], -1)
            for layer in self.heads:  # the i-th member of each batched layer
                x = torch.addmm(layer.bias[i], x, layer.weight[i]) if isinstance(layer, EnsembleLinear) else layer(x)
            label = torch.multinomial(torch.softmax(x, -1), 1).squeeze(-1)  # (what Categorical.sample draws)
            action[:, i] = self.low[i] + (label + torch.rand_like(label, dtype=torch.float32)) * width[i]
        return action.view(-1, n_samples, self.act_dim)


@dataclass
class Learner:
    """What EMaQ learns, with its optimisers: built, saved and loaded as one."""

    behavior: AutoregressiveBehavior
    q_ensemble: QEnsemble
    target_q: QEnsemble
    mu_opt: torch.optim.Optimizer
    q_opt: torch.optim.Optimizer

    SAVED = ("behavior", "q_ensemble", "target_q", "mu_opt", "q_opt")


def make_learner(args: Args, action_space: gym.spaces.Box, obs_dim: int, device) -> Learner:
    behavior = AutoregressiveBehavior(obs_dim, action_space.low, action_space.high, args.n_bins, embed=args.mu_embed,
                                      hidden=args.mu_hidden, embed_layers=args.mu_embed_layers,
                                      layers=args.mu_layers).to(device)
    # Alg. 1: K Q-functions, and K targets with the same parameters.
    q_ensemble = QEnsemble(obs_dim, action_space.shape[0], args.num_q, args.q_hidden, args.q_layers).to(device)
    return Learner(behavior, q_ensemble, copy.deepcopy(q_ensemble).requires_grad_(False),
                   torch.optim.Adam(behavior.parameters(), lr=args.mu_lr),
                   torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr))


# ----------------------------------------------------------------------------
# Evaluation, and the two phases of Algorithm 1: pretrain mu, then the Q-ensemble
# ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(args: Args, env_spec, learner: Learner, obs_mean, obs_std, device) -> np.ndarray:
    """Returns of --eval-episodes episodes of the EMaQ policy, run side by side; the
    networks see observations standardised as the dataset's were."""
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(
        [lambda: make_env(env_spec)] * args.eval_episodes, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP))
    obs, _ = envs.reset(seed=args.seed + 10_000)
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        o = (torch.as_tensor(obs, dtype=torch.float32, device=device) - obs_mean) / obs_std
        action = act(o, learner.behavior, learner.q_ensemble, args.n_samples, args.ensemble_lambda)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


def mu_step(args: Args, obs: torch.Tensor, action: torch.Tensor, learner: Learner) -> torch.Tensor:
    """One maximum-likelihood step of mu on a batch (Appendix B); returns the NLL, on the device."""
    loss = -learner.behavior.log_prob_bins(obs, action).mean()
    learner.mu_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.mu_opt.step()
    return loss.detach()


def fit_behavior(args: Args, data: dict, learner: Learner, first_step: int, writer,
                 step=mu_step) -> tuple[dict, int]:
    """Alg. 1's "pretrain mu(a|s) on D": maximum likelihood of the dataset's actions
    (Appendix B), from first_step to --mu-steps; `step` is mu_step or its compiled twin.
    Returns the last logged NLL and the step reached (--mu-steps, unless a Stop came first)."""
    num_transitions, device = len(data["reward"]), data["reward"].device
    metrics, start = {}, time.time()
    for i in range(first_step, args.mu_steps):
        if Stop.signal:  # the safe point: between two gradient steps; a resumed run goes on from here
            return metrics, i
        batch = torch.randint(0, num_transitions, (args.batch_size,), device=device)
        loss = step(args, data["obs"][batch], data["action"][batch], learner)
        if (i + 1) % 1000 == 0 or i + 1 == args.mu_steps:
            metrics["mu_nll"] = loss.item()
            if not math.isfinite(metrics["mu_nll"]):
                raise non_finite(args, f"non-finite mu NLL at mu step {i + 1}")
            writer.add_scalar("losses/mu_nll", metrics["mu_nll"], i + 1)
            if (i + 1) % 10_000 == 0 or i + 1 == args.mu_steps:
                print(f"mu step {i + 1}/{args.mu_steps} | nll {metrics['mu_nll']:.3f} | "
                      f"{(i + 1 - first_step) / (time.time() - start):.0f} steps/s", flush=True)
    return metrics, max(first_step, args.mu_steps)


def q_step(args: Args, batch: dict, learner: Learner) -> torch.Tensor:
    """One pass of Alg. 1's loop on a batch: the Expected-Max target from N actions of mu, a
    gradient step of every member, the targets' EMA; returns (loss, mean Q), on the device."""
    # Eq. 11: y = r + gamma (1 - t) max_i Ensemble(Q_target(s', a'_i)), N actions a'_i ~ mu(.|s').
    y = emaq_target(batch, learner.behavior, learner.target_q, args.n_samples, args.ensemble_lambda, args.gamma)
    q = learner.q_ensemble(batch["obs"], batch["action"])  # [K, B]
    loss = (q - y).pow(2).mean(1).sum()  # Eq. 10: each member regresses on the shared target
    learner.q_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.q_opt.step()
    with torch.no_grad():  # Alg. 1: theta_target <- ema * theta_target + (1 - ema) * theta
        for p, tp in zip(learner.q_ensemble.parameters(), learner.target_q.parameters()):
            tp.lerp_(p, 1 - args.ema)
    return torch.stack([loss.detach(), q.detach().mean()])


def train_q(args: Args, data: dict, learner: Learner, n_updates: int, step=q_step) -> tuple[dict, int]:
    """n_updates passes of Alg. 1's "while not converged" loop (`step` is q_step or its compiled
    twin); returns the mean loss and Q, and the updates done (n_updates, unless a Stop came first)."""
    num_transitions, device = len(data["reward"]), data["reward"].device
    sums, taken = torch.zeros(2, device=device), 0
    for _ in range(n_updates):
        if Stop.signal:  # the safe point: between two gradient steps
            break
        i = torch.randint(0, num_transitions, (args.batch_size,), device=device)  # Alg. 1: a batch from D
        sums, taken = sums + step(args, {k: v[i] for k, v in data.items()}, learner), taken + 1
    q_loss, q_mean = (sums / max(1, taken)).tolist()
    return {"q_loss": q_loss, "q_mean": q_mean}, taken


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
# Around the loop: the command line, seeds, logs, checkpoints
# ----------------------------------------------------------------------------


def check_args(args: Args) -> None:
    """Raise UsageError for a bad command line, before anything is built."""
    problems = [
        (min(args.n_samples, args.num_q, args.batch_size, args.eval_every, args.q_hidden, args.q_layers,
             args.mu_embed, args.mu_hidden) < 1,
         "--n-samples, --num-q, --batch-size, --eval-every, --q-hidden, --q-layers, --mu-embed and --mu-hidden "
         "must be >= 1"),
        (min(args.mu_embed_layers, args.mu_layers) < 0, "--mu-embed-layers and --mu-layers cannot be negative"),
        (min(args.num_updates, args.mu_steps, args.eval_episodes) < 0, "step and episode counts cannot be negative"),
        (not 0 <= args.ensemble_lambda <= 1, "--ensemble-lambda must be in [0, 1]"),
        (not 0 <= args.ema < 1, "--ema must be in [0, 1)"),
        (not 0 < args.gamma < 1, "--gamma must be in (0, 1)"),
        (args.n_bins < 2, "--n-bins must be >= 2"),
        (min(args.q_lr, args.mu_lr) <= 0, "learning rates must be > 0"),
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
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


def open_writer(args: Args, run_name: str) -> SummaryWriter:
    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def non_finite(args: Args, what: str) -> FloatingPointError:
    """The error for a non-finite loss: it names the sensitive flags set away from their defaults."""
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SENSITIVE
               if getattr(args, k) != getattr(Args(), k)]
    return FloatingPointError(f"{what}; likely cause: {', '.join(changed) or 'none of the flags'}")


def load_checkpoint(args: Args, learner: Learner) -> tuple[int, int, Optional[str]]:
    """Load --checkpoint-path into learner (and, to resume, into the random streams); return the mu
    steps and Q updates it had done and its run name. A file that does not fit this run is refused
    with one line naming it and the mismatch."""
    path = args.checkpoint_path
    try:
        ckpt = torch.load(path, map_location=learner.behavior.low.device, weights_only=False)
    except Exception as e:  # not a file torch can read: say so, not a pickle stack trace
        raise UsageError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} (it holds a {type(ckpt).__name__})")
    missing = [k for k in (*Learner.SAVED, "args", "mu_done", "q_done") if k not in ckpt]
    if ckpt.get("script", SCRIPT) != SCRIPT or missing:  # (older checkpoints have no "script")
        why = ckpt["script"] if ckpt.get("script", SCRIPT) != SCRIPT else "no " + ", ".join(missing)
        raise UsageError(f"{path} is not a checkpoint of {SCRIPT} ({why})")
    if ckpt["args"]["dataset_id"] != args.dataset_id:
        raise UsageError(f"{path} was trained on {ckpt['args']['dataset_id']}, not {args.dataset_id}")
    for flag in ("n_bins", "num_q", "q_hidden", "q_layers", "mu_embed", "mu_embed_layers", "mu_hidden",
                 "mu_layers"):  # the networks' shapes
        saved = ckpt["args"].get(flag, getattr(Args, flag))
        if saved != getattr(args, flag):
            raise UsageError(f"{path} has --{flag.replace('_', '-')} {saved}; pass the same")
    for k in Learner.SAVED:
        try:
            getattr(learner, k).load_state_dict(ckpt[k])
        except (RuntimeError, ValueError, KeyError) as e:  # networks of another shape
            raise UsageError(f"{path}: its {k} does not fit this run's ({str(e).strip().splitlines()[-1][:160]})")
    if "rng" in ckpt and not args.eval_only:  # the random streams go on where they stopped
        random.setstate(ckpt["rng"]["python"])
        np_state = ckpt["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], np.uint32), *np_state[2:]))
        torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["mu_done"], ckpt["q_done"], ckpt.get("run_name")


def save_checkpoint(args: Args, learner: Learner, run_name: str, mu_done: int, q_done: int) -> str:
    """Write runs/<run>/<exp_name>.pt atomically (a run killed mid-write leaves the last good checkpoint)."""
    path = f"runs/{run_name}/{args.exp_name}.pt"
    np_state = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
               torch=torch.get_rng_state())
    torch.save({k: getattr(learner, k).state_dict() for k in Learner.SAVED} | dict(
        script=SCRIPT, args=asdict(args), mu_done=mu_done, q_done=q_done, run_name=run_name, rng=rng), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def exit_interrupted(args: Args, learner: Learner, run_name: str, mu_done: int, q_done: int) -> None:
    """After Stop.signal: save the run as it stands and exit with the command that resumes it."""
    path = os.path.abspath(save_checkpoint(args, learner, run_name, mu_done, q_done))
    defaults = asdict(Args())
    flags = [(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
             else f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items()
             if v != defaults[k] and k != "checkpoint_path"]
    where = f"update {q_done}" if mu_done >= args.mu_steps else f"mu step {mu_done}"
    print(f"stopped by {signal.Signals(Stop.signal).name} after {where}, saved; resume with: "
          f"{shlex.join(['python', SCRIPT, *flags, f'--checkpoint-path={path}'])}", file=sys.stderr, flush=True)
    raise SystemExit(128 + Stop.signal)


def log_evaluation(writer, metrics: dict, returns: np.ndarray, refs: Optional[tuple]) -> str:
    """Log an evaluation's mean return (and normalised score); returns the status line's part."""
    metrics["eval_return"] = float(returns.mean())
    writer.add_scalar("charts/eval_return", metrics["eval_return"], metrics["updates"])
    if refs:
        metrics["normalized_score"] = normalized_score(metrics["eval_return"], refs)
        writer.add_scalar("charts/normalized_score", metrics["normalized_score"], metrics["updates"])
    return f" | eval return {with_score(metrics['eval_return'], refs)}"


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def train(args: Args) -> dict:
    """EMaQ (Algorithm 1): fit mu to the dataset, then the Q-ensemble on Expected-Max
    targets, evaluating every --eval-every updates; returns the final metrics."""
    check_args(args)
    device = seed_and_device(args)
    data, info = load_transitions(args.dataset_id, args.download, device, args.gamma)
    env_spec, refs, dataset_return = info.env_spec, info.refs, info.mean_return
    num_transitions, obs_dim = len(data["reward"]), data["obs"].shape[1]
    # Observations are standardised with the dataset's statistics (fixed: the data is).
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0).clamp(min=1e-3)
    for k in ("obs", "next_obs"):
        data[k] = (data[k] - obs_mean) / obs_std
    learner = make_learner(args, info.action_space, obs_dim, device)
    # A checkpoint's run goes on: its log directory, step counters and random state.
    mu_done, q_done, saved_name = load_checkpoint(args, learner) if args.checkpoint_path else (0, 0, None)
    run_name = saved_name or f"{env_spec.id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.eval_only:
        returns = evaluate(args, env_spec, learner, obs_mean, obs_std, device)
        print(f"eval return {with_score(returns.mean(), refs)} +- {returns.std():.1f}")
        return {"eval_return": float(returns.mean()), "eval_returns": returns.tolist()}
    writer = open_writer(args, run_name)
    print(f"EMaQ (N={args.n_samples}) on {args.dataset_id}: {num_transitions} transitions of {env_spec.id}, dataset "
          f"return {with_score(dataset_return, refs)}; logs in runs/{run_name} ({device})")
    metrics: dict = {"eval_return": float("nan"), "dataset_return": dataset_return}
    if not saved_name:  # (a resumed run has logged them)
        writer.add_scalar("charts/dataset_return", dataset_return, 0)  # what EMaQ should beat
        # Q's scale: the dataset's discounted returns to go (on datasets whose episodes were cut short by a
        # time limit, the values Q estimates also count the rewards after the cut).
        writer.add_scalar("charts/dataset_discounted_return", info.discounted_return, 0)

    # 1. Alg. 1: pretrain mu on D (a resumed run goes on from the checkpoint's step).
    mu_metrics, mu_done = fit_behavior(args, data, learner, mu_done, writer, compiled(mu_step, args, device))
    metrics |= mu_metrics
    if q_done == 0 and args.eval_episodes > 0 and not Stop.signal:  # mu's own return: the EMaQ policy at N = 1
        metrics["behavior_return"] = float(evaluate(replace(args, n_samples=1), env_spec, learner, obs_mean, obs_std,
                                                    device).mean())
        writer.add_scalar("charts/behavior_return", metrics["behavior_return"], 0)
        print(f"mu alone (N = 1): eval return {with_score(metrics['behavior_return'], refs)}; the dataset's "
              f"discounted return to go, the scale of Q: {info.discounted_return:.1f}", flush=True)

    # 2. Alg. 1's loop, in stretches that end at a multiple of --eval-every (or the last update).
    updates, start, eval_seconds, q_update = q_done, time.time(), 0.0, compiled(q_step, args, device)
    while updates < args.num_updates and not Stop.signal:
        n_updates = min(args.eval_every - updates % args.eval_every, args.num_updates - updates)
        stretch, taken = train_q(args, data, learner, n_updates, q_update)
        updates += taken
        if taken < n_updates:  # a Stop cut the stretch short: the resumed run finishes it and logs it
            break
        metrics |= stretch
        if not math.isfinite(metrics["q_loss"]):
            raise non_finite(args, f"non-finite Q loss at update {updates} ({metrics['q_loss']})")
        ups = (updates - q_done) / (time.time() - start - eval_seconds)  # training only
        metrics.update(updates_per_second=ups, updates=updates)
        writer.add_scalar("losses/q_loss", metrics["q_loss"], updates)
        writer.add_scalar("losses/q_mean", metrics["q_mean"], updates)
        writer.add_scalar("charts/updates_per_second", ups, updates)
        line = f"update {updates}/{args.num_updates} | q loss {metrics['q_loss']:.4f} q {metrics['q_mean']:.2f}"
        if args.eval_episodes > 0:
            eval_start = time.time()
            returns = evaluate(args, env_spec, learner, obs_mean, obs_std, device)
            eval_seconds += time.time() - eval_start
            line += log_evaluation(writer, metrics, returns, refs)
        if args.save_model:
            metrics["checkpoint"] = save_checkpoint(args, learner, run_name, mu_done, updates)
        print(f"{line} | {ups:.1f} updates/s", flush=True)
    if Stop.signal:  # the run as it stands, in mu's pre-training or in the Q loop
        exit_interrupted(args, learner, run_name, mu_done, updates)

    writer.close()
    print(f"done: eval return {with_score(metrics['eval_return'], refs)}, "
          f"dataset return {with_score(dataset_return, refs)}")
    return metrics | {"run_name": run_name}


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    Stop.catch_signals()
    try:
        train(cli_args)
    except UsageError as e:
        sys.exit(f"error: {e}")
