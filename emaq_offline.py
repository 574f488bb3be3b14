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
    python emaq_offline.py --dataset-id local/hopper/qwr-replay-v0 --no-download  # made by benchmarks/datasets.py
"""

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # name of this experiment (part of the run directory)
    seed: int = 1  # seed of python, numpy, torch and the evaluation environments
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = True  # use CUDA when it is available (the dataset and all updates live there)
    compile: bool = False  # torch.compile the gradient steps of mu and Q (faster; on a CPU it needs a C++ compiler)
    dataset_id: str = "mujoco/walker2d/medium-v0"  # Minari dataset: a standard one, or one of benchmarks/datasets.py
    download: bool = True  # download --dataset-id with Minari when it is not in the local store

    # EMaQ (Section 3, Table 2)
    n_samples: int = 10  # N, actions drawn from mu for the backup and for acting (the paper sweeps 5 ... 400)
    num_q: int = 8  # K, Q-networks in the ensemble
    q_hidden: int = 750  # units in each hidden layer of every Q-network (Table 2: 750; Table 3: 256)
    q_layers: int = 3  # hidden layers of every Q-network (Table 2: 3; Table 3: 4)
    ensemble_lambda: float = 1.0  # a target combines the K members as lambda * min + (1 - lambda) * max
    num_updates: int = 1_000_000  # Q-ensemble gradient steps
    q_lr: float = 1e-4  # Adam learning rate of the Q-networks
    ema: float = 0.995  # target networks: theta_target <- ema * theta_target + (1 - ema) * theta after each step
    batch_size: int = 256  # transitions per gradient step (Q and mu)
    gamma: float = 0.99  # discount factor

    # Behaviour model mu (Appendix B)
    mu_steps: int = 100_000  # maximum-likelihood steps of mu before Q-learning (the paper gives no count)
    mu_lr: float = 5e-4  # Adam learning rate of mu
    n_bins: int = 40  # bins per action dimension
    mu_embed: int = 750  # units of mu's state-embedding MLP and of the embedding (Appendix G.1: 750; Table 3: 256)
    mu_embed_layers: int = 2  # hidden layers of mu's state-embedding MLP (Appendix G.1: 2; Table 3: 4)
    mu_hidden: int = 256  # units in each hidden layer of mu's per-dimension MLPs (Appendix G.1: 256; Table 3: 128)
    mu_layers: int = 3  # hidden layers of mu's per-dimension MLPs (Appendix G.1: 3; Table 3: 1)

    # Evaluation, logging, checkpoints
    eval_every: int = 10_000  # evaluate the policy (best of N actions from mu) every this many Q updates
    eval_episodes: int = 10  # episodes per evaluation, in the environment the dataset names
    save_model: bool = False  # write a checkpoint after mu's training and at each evaluation
    checkpoint_path: Optional[str] = None  # checkpoint to resume from, in its run directory


# The math of EMaQ: the target (Eq. 11) and the policy (Algorithm 1)


def combine(q: torch.Tensor, lam: float) -> torch.Tensor:
    """Ensemble(values) of Algorithm 1: lambda * min + (1 - lambda) * max over the members (dim 0)."""
    return lam * q.min(0).values + (1 - lam) * q.max(0).values


@torch.no_grad()
def emaq_target(batch: dict, behavior, target_q, n_samples: int, lam: float, gamma: float) -> torch.Tensor:
    """y = r + gamma (1 - terminated) max_{i <= N} Ensemble(Q_target(s', a'_i)), a'_i ~ mu(.|s')
    (Eq. 11; y_target of Algorithm 1): the members are combined per action, then the best of N taken."""
    next_actions = behavior.sample(batch["next_obs"], n_samples)  # [B, N, d]
    B = len(next_actions)
    next_obs = batch["next_obs"].repeat_interleave(n_samples, 0)
    q = combine(target_q(next_obs, next_actions.reshape(B * n_samples, -1)), lam).view(B, n_samples)
    return batch["reward"] + gamma * (~batch["terminated"]) * q.max(-1).values


@torch.no_grad()
def act(obs: torch.Tensor, behavior, q_ensemble, n_samples: int, lam: float) -> torch.Tensor:
    """The EMaQ policy pi^N_mu (pi_test of Algorithm 1): the best of N actions from mu under the ensemble."""
    actions = behavior.sample(obs, n_samples)  # [B, N, d]
    B = len(actions)
    q = combine(q_ensemble(obs.repeat_interleave(n_samples, 0), actions.reshape(B * n_samples, -1)), lam)
    return actions[torch.arange(B), q.view(B, n_samples).argmax(-1)]


# The dataset as flat transitions, and its evaluation environment


# D4RL's random and expert returns of its MuJoCo tasks (scores 0 and 100), for datasets that carry none.
D4RL_REF_SCORES = {"HalfCheetah": (-280.178953, 12135.0), "Hopper": (-20.272305, 3234.3),
                   "Walker2d": (1.629008, 4592.3)}


def open_dataset(dataset_id: str, download: bool):
    """The Minari dataset from the local store, else downloaded by Minari (unless not download), else one
    line that says how to get it. The local store comes first: its errors (a broken file) are not the network's."""
    where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        why = f"no Minari dataset {dataset_id!r} in {where} (--no-download)"
    if download:
        try:
            return minari.load_dataset(dataset_id, download=True)
        except Exception as e:  # an unknown id, no network (the HTTP client's own error), no huggingface_hub
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            why = f"cannot download Minari dataset {dataset_id!r} ({type(e).__name__}: {first_line})"
    local = ", ".join(sorted(minari.list_local_datasets())) or "none"
    raise SystemExit(f"error: {why}; get it with `minari download {dataset_id}` (on a machine with internet, then "
                     f"copy it into {where}), or make one with benchmarks/datasets.py; local datasets: {local}")


def eval_env_spec(dataset, dataset_id: str) -> tuple:
    """The environment the dataset names for evaluation (Minari's eval_env_spec, else the one it was
    collected in): its spec, observation and action spaces; a missing package is one line."""
    try:
        env = dataset.recover_environment(eval_env=True)
    except ModuleNotFoundError as e:  # e.g. gymnasium_robotics, for kitchen, antmaze and Adroit
        package = (e.name or "?").split(".")[0].replace("_", "-")
        raise SystemExit(f"error: {dataset_id} evaluates in an environment of {package}: pip install {package}")
    except (gym.error.Error, ValueError, TypeError) as e:  # no env stored, or kwargs this version does not take
        raise SystemExit(f"error: cannot make {dataset_id}'s environment: {str(e).strip()[:200]}")
    env.close()
    return env.spec, env.observation_space, env.action_space


def make_env(spec) -> gym.Env:
    """The evaluation environment; a Dict observation (antmaze, kitchen) flattened as flat_obs does."""
    env = gym.make(spec)
    return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env


def flat_obs(space: gym.Space, obs) -> np.ndarray:
    """A dataset's observations [T, ...] as flat vectors [T, n]: the parts of a Dict space (nested
    ones too) joined in the space's order, as gymnasium's FlattenObservation does."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flat_obs(sub, obs[k]) for k, sub in space.spaces.items()], -1)
    return np.asarray(obs, np.float32).reshape(len(obs), -1)


def load_dataset(args: Args, device) -> tuple[dict, dict]:
    """The dataset as flat transitions (s, a, r, s', terminated) on the device, and what evaluating
    against it needs: the env spec, the action space, (random, expert) returns for normalised scores,
    the mean episode return and the mean discounted return to go (the scale of Q)."""
    dataset = open_dataset(args.dataset_id, args.download)
    spec, obs_space, action_space = eval_env_spec(dataset, args.dataset_id)
    if not isinstance(action_space, gym.spaces.Box):
        raise SystemExit(f"error: emaq_offline.py needs continuous (Box) actions; {args.dataset_id} has {action_space}")
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
        for r in ep.rewards[::-1]:  # the discounted return from each step to the end of its episode
            g = float(r) + args.gamma * g
            to_go.append(g)
    data = {k: torch.as_tensor(np.concatenate(v)).to(device) for k, v in parts.items()}
    for k in ("obs", "action", "reward", "next_obs"):
        data[k] = data[k].float()
    meta = dataset.storage.metadata
    refs = ((meta["ref_min_score"], meta["ref_max_score"]) if meta.get("ref_max_score") is not None
            else D4RL_REF_SCORES.get(spec.id.split("/")[-1].split("-")[0]))  # D4RL's, for its MuJoCo tasks
    return data, dict(spec=spec, action_space=action_space, refs=refs, dataset_return=float(np.mean(episode_returns)),
                      discounted_return=float(np.mean(to_go)))


# Networks: the autoregressive behaviour model and the Q-ensemble


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
        return self.net(torch.cat([obs, action], -1).expand(self.k, -1, -1)).squeeze(-1)


class AutoregressiveBehavior(nn.Module):
    """mu(a|s) = prod_i p(l_i | s, a[:i]) * Uniform(a_i | bin l_i) (Appendix B, Eqs. 62-66).

    The state embedding is an MLP of ReLU units with a linear output of the same width (Appendix G.1:
    2 layers of 750). Dimension i has its own MLP (3 layers of 256) of the embedding and the actions
    before i. The d MLPs run as one batched ensemble: each sees all actions, with a[i:] masked to 0,
    the same function as an MLP of a[:i] alone. Table 3's models also pass a[:i] through a linear map
    first; the paper says this was not needed, and it is left out here.
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
    """What EMaQ learns, with its optimisers: mu, the Q-ensemble and its EMA targets."""

    behavior: AutoregressiveBehavior
    q_ensemble: QEnsemble
    target_q: QEnsemble
    mu_opt: torch.optim.Optimizer
    q_opt: torch.optim.Optimizer


def make_learner(args: Args, obs_dim: int, action_space: gym.spaces.Box, device) -> Learner:
    behavior = AutoregressiveBehavior(obs_dim, action_space.low, action_space.high, args.n_bins, embed=args.mu_embed,
                                      hidden=args.mu_hidden, embed_layers=args.mu_embed_layers,
                                      layers=args.mu_layers).to(device)
    # Alg. 1: K Q-functions, and K targets with the same parameters.
    q_ensemble = QEnsemble(obs_dim, action_space.shape[0], args.num_q, args.q_hidden, args.q_layers).to(device)
    return Learner(behavior, q_ensemble, copy.deepcopy(q_ensemble).requires_grad_(False),
                   torch.optim.Adam(behavior.parameters(), lr=args.mu_lr),
                   torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr))


# Evaluation, batches, and the two gradient steps of Algorithm 1


@torch.no_grad()
def evaluate(args: Args, spec, learner: Learner, obs_mean, obs_std, n_samples: int) -> np.ndarray:
    """Returns of --eval-episodes episodes of the EMaQ policy with N = n_samples, run side by side;
    the networks see observations standardised as the dataset's were."""
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(
        [lambda: make_env(spec)] * args.eval_episodes, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP))
    obs, _ = envs.reset(seed=args.seed + 10_000)
    returns = np.full(args.eval_episodes, np.nan)
    while np.isnan(returns).any():
        o = (torch.as_tensor(obs, dtype=torch.float32, device=obs_mean.device) - obs_mean) / obs_std
        action = act(o, learner.behavior, learner.q_ensemble, n_samples, args.ensemble_lambda)
        obs, _, _, _, info = envs.step(action.cpu().numpy())
        if "episode" in info:
            first = info["_episode"] & np.isnan(returns)  # keep each env's first episode
            returns[first] = info["episode"]["r"][first]
    envs.close()
    return returns


def sample(data: dict, batch_size: int) -> dict:
    """Alg. 1: a batch of transitions drawn uniformly from D."""
    i = torch.randint(0, len(data["reward"]), (batch_size,), device=data["reward"].device)
    return {k: v[i] for k, v in data.items()}


def mu_step(args: Args, batch: dict, learner: Learner) -> torch.Tensor:
    """One maximum-likelihood step of mu (Appendix B); returns the NLL, on the device."""
    loss = -learner.behavior.log_prob_bins(batch["obs"], batch["action"]).mean()
    learner.mu_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.mu_opt.step()
    return loss.detach()


def q_step(args: Args, batch: dict, learner: Learner) -> torch.Tensor:
    """One pass of Alg. 1's loop: the Expected-Max target from N actions of mu at s', a gradient step of
    every member, the targets' EMA; returns (loss, mean Q), on the device."""
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


def save_checkpoint(path: str, learner: Learner, **info) -> str:
    """The networks and optimisers, written atomically: a run killed while writing keeps its last checkpoint."""
    torch.save({k: v.state_dict() for k, v in vars(learner).items()} | info, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def train(args: Args) -> dict:
    """EMaQ (Algorithm 1): fit mu to the dataset, then the Q-ensemble on Expected-Max targets,
    evaluating every --eval-every updates; returns the final metrics."""
    if min(args.n_samples, args.num_q, args.batch_size, args.eval_every) < 1 or not 0 <= args.ensemble_lambda <= 1:
        raise SystemExit("error: --n-samples, --num-q, --batch-size and --eval-every must be >= 1, "
                         "--ensemble-lambda in [0, 1]")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    data, info = load_dataset(args, device)
    refs, spec, n = info["refs"], info["spec"], len(data["reward"])
    # Observations are standardised with the dataset's statistics (fixed: the data is).
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0).clamp(min=1e-3)
    for k in ("obs", "next_obs"):
        data[k] = (data[k] - obs_mean) / obs_std
    learner = make_learner(args, data["obs"].shape[1], info["action_space"], device)
    updates, mu_log = 0, []  # Q updates done; mu's NLL every 1000 steps, (step, nll)
    run_name = f"{spec.id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.checkpoint_path:  # the run goes on after its last checkpoint (mu trained), in its own log directory
        ckpt = torch.load(args.checkpoint_path, map_location=device, weights_only=False)
        for k, v in vars(learner).items():
            v.load_state_dict(ckpt[k])
        updates, mu_log, run_name = ckpt["updates"], ckpt["mu_log"], ckpt["run_name"]
        torch.manual_seed(args.seed + updates)  # not the random numbers of the first updates again
    writer = SummaryWriter(f"runs/{run_name}", purge_step=updates + 1 if args.checkpoint_path else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    torch._inductor.config.fallback_random = True  # compiled code draws the random numbers eager code does
    mu_update = torch.compile(mu_step) if args.compile else mu_step
    q_update = torch.compile(q_step) if args.compile else q_step
    print(f"EMaQ (N={args.n_samples}) on {args.dataset_id}: {n} transitions of {spec.id}, mean episode return "
          f"{info['dataset_return']:.1f}; logs in runs/{run_name} ({device})", flush=True)
    metrics = dict(dataset_return=info["dataset_return"], eval_return=float("nan"))
    path = f"runs/{run_name}/{args.exp_name}.pt"
    if not args.checkpoint_path:
        writer.add_scalar("charts/dataset_return", info["dataset_return"], 0)  # what EMaQ should beat
        # Q's scale: the dataset's discounted returns to go (where a time limit cut an episode short,
        # the values Q estimates also count the rewards after the cut).
        writer.add_scalar("charts/dataset_discounted_return", info["discounted_return"], 0)
        # 1. Alg. 1: pretrain mu(a|s) on D by maximum likelihood (Appendix B).
        start = time.time()
        for i in range(args.mu_steps):
            loss = mu_update(args, sample(data, args.batch_size), learner)
            if (i + 1) % 1000 == 0 or i + 1 == args.mu_steps:  # read every 1000 steps: no sync in between
                nll = loss.item()
                if not math.isfinite(nll):
                    raise FloatingPointError(f"non-finite mu NLL at mu step {i + 1}")
                mu_log.append((i + 1, nll))
                writer.add_scalar("losses/mu_nll", nll, i + 1)
                if (i + 1) % 10_000 == 0 or i + 1 == args.mu_steps:
                    print(f"mu step {i + 1}/{args.mu_steps} | nll {nll:.3f} | "
                          f"{(i + 1) / (time.time() - start):.0f} steps/s", flush=True)
        if args.eval_episodes > 0:  # mu's own return: the EMaQ policy at N = 1
            metrics["behavior_return"] = float(evaluate(args, spec, learner, obs_mean, obs_std, 1).mean())
            writer.add_scalar("charts/behavior_return", metrics["behavior_return"], 0)
            print(f"mu alone (N = 1): eval return {metrics['behavior_return']:.1f}; the dataset's discounted "
                  f"return to go, the scale of Q: {info['discounted_return']:.1f}", flush=True)
        if args.save_model:  # mu trained: a killed run resumes here
            writer.flush()
            metrics["checkpoint"] = save_checkpoint(path, learner, updates=0, mu_log=mu_log, run_name=run_name)
    else:  # the points of mu's curve past the checkpoint's update, hidden by purge_step, logged again
        for step, nll in mu_log:
            if step > updates:
                writer.add_scalar("losses/mu_nll", nll, step)
    if mu_log:
        metrics["mu_nll"] = mu_log[-1][1]

    # 2. Alg. 1's loop, in stretches that end at a multiple of --eval-every (or the last update).
    start, first, eval_seconds = time.time(), updates, 0.0
    while updates < args.num_updates:
        sums, stretch = torch.zeros(2, device=device), min(args.eval_every - updates % args.eval_every,
                                                           args.num_updates - updates)
        for _ in range(stretch):
            sums = sums + q_update(args, sample(data, args.batch_size), learner)
        updates += stretch
        metrics["q_loss"], metrics["q_mean"] = (sums / stretch).tolist()  # read once a stretch: no sync inside
        if not math.isfinite(metrics["q_loss"]):
            raise FloatingPointError(f"non-finite Q loss at update {updates} ({metrics['q_loss']})")
        metrics |= dict(updates=updates, updates_per_second=(updates - first) / (time.time() - start - eval_seconds))
        writer.add_scalar("losses/q_loss", metrics["q_loss"], updates)
        writer.add_scalar("losses/q_mean", metrics["q_mean"], updates)
        writer.add_scalar("charts/updates_per_second", metrics["updates_per_second"], updates)
        line = f"update {updates}/{args.num_updates} | q loss {metrics['q_loss']:.4f} q {metrics['q_mean']:.2f}"
        if args.eval_episodes > 0:
            eval_start = time.time()
            metrics["eval_return"] = float(evaluate(args, spec, learner, obs_mean, obs_std, args.n_samples).mean())
            eval_seconds += time.time() - eval_start
            writer.add_scalar("charts/eval_return", metrics["eval_return"], updates)
            line += f" | eval return {metrics['eval_return']:.1f}"
            if refs:  # D4RL's normalised score: 0 random, 100 expert
                metrics["normalized_score"] = 100 * (metrics["eval_return"] - refs[0]) / (refs[1] - refs[0])
                writer.add_scalar("charts/normalized_score", metrics["normalized_score"], updates)
                line += f" (score {metrics['normalized_score']:.1f})"
        if args.save_model:  # at the stretch's end: a killed run resumes here, redoing at most one stretch
            writer.flush()
            metrics["checkpoint"] = save_checkpoint(path, learner, updates=updates, mu_log=mu_log, run_name=run_name)
        print(f"{line} | {metrics['updates_per_second']:.1f} updates/s", flush=True)
    writer.close()
    print(f"done: eval return {metrics['eval_return']:.1f}, dataset return {info['dataset_return']:.1f}")
    return metrics | {"run_name": run_name}


if __name__ == "__main__":
    train(tyro.cli(Args))
