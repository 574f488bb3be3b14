"""BitFlip: the QWR paper's experiment where AWR fails and QWR does not (Fig. 1).

BitFlip(N) (../shared/papers/qwr.md, Section 2.2): the state is N bits and a
step counter; action i flips bit i, for +1 if it turned a 0 into a 1 and -1
otherwise; a game lasts 5 steps from a random start with at least 5 zeros, so
the best return is 5. With 2^N start states, a replay buffer almost never holds
a state twice: it satisfies "state determines action", under which the AWR
actor can only clone the buffer (Theorems 1-2), while the QWR actor moves
towards mu(a|s) exp(A(s, a) / beta) (Theorem 3).

Both algorithms are here with every hyper-parameter shared (the Fig. 1
protocol: 10 iterations of 1000 interactions, 300 critic and 300 actor steps;
Table 4 where it applies; learning rates 1e-2, see --actor-lr): AWR (Algorithm 1) with a value critic V(s) and
advantages of the buffer's actions; QWR (Algorithm 2) with the mean backup
and a Q critic. With discrete actions QWR needs no sampling: the critic has
one output per action, the backup and the actor loss sum exactly over the N
actions weighted by the stored mu (what the authors' code does when k = N).

    python bitflip.py --algo qwr --n-bits 20
    python bitflip.py --sweep            # both algorithms over N, at both learning rates: CSV + PNG
"""

import copy
import csv
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

GAME_LENGTH = 5


@dataclass
class Args:
    algo: Literal["qwr", "awr"] = "qwr"
    """QWR (Q critic, mu-weighted actor over all actions) or AWR (V critic, buffer actions)"""
    n_bits: int = 20
    """N, the number of bits (and of actions)"""
    seed: int = 1
    """seed of python, numpy, torch and the games"""
    torch_deterministic: bool = True
    """make torch's algorithms deterministic (same seed, same numbers)"""
    cuda: bool = False
    """run the networks on CUDA if available (CPU is faster at this size)"""

    # The protocol of Fig. 1
    iterations: int = 10
    """iterations of collect / train critic / train actor"""
    steps_per_iteration: int = 1000
    """interactions collected per iteration (200 games of 5 steps)"""
    critic_steps: int = 300
    """critic gradient steps per iteration"""
    actor_steps: int = 300
    """actor gradient steps per iteration"""
    eval_episodes: int = 10
    """games played by the trained agent to report its mean return"""

    # Shared hyper-parameters (Table 4)
    batch_size: int = 256
    """states per gradient step"""
    critic_lr: float = 1e-2
    """Adam learning rate of the critic (see actor_lr)"""
    # The paper gives no learning rate for BitFlip; 1e-2 is the authors' (Trax)
    # discrete-action AWR setting. Fig. 1's collapse of AWR shows only with it:
    # with Table 4's MuJoCo rates (1e-4 and 5e-4) the networks do not memorise
    # the buffer in 3000 steps, the condition the paper names for AWR's failure
    # (Appendix 6.2). The sweep runs both (--sweep-lrs); README, BitFlip.
    actor_lr: float = 1e-2
    """Adam learning rate of the actor (the paper gives none; 1e-2 as the authors' discrete-action AWR)"""
    target_update_every: int = 100
    """critic steps between copies of the critic into its target"""
    gamma: float = 0.99
    """discount factor"""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) mix of the 1..T-step targets"""
    n_steps: int = 3
    """T, horizon of the multi-step targets"""
    beta: float = 1.0
    """temperature of the advantage weights exp(A / beta)"""
    max_weight: float = 20.0
    """advantage weights are clipped at this value"""
    hidden: int = 256
    """width of the two hidden layers of both networks"""
    backup: Literal["mean", "max", "lse"] = "mean"
    """QWR's backup over the actions (the paper's BitFlip runs use mean)"""
    tau: float = 0.3
    """temperature of the lse backup"""

    # Sweep (Fig. 1)
    sweep: bool = False
    """run both algorithms over --sweep-n-bits and --sweep-seeds; write CSV, PNG and a table"""
    sweep_n_bits: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 16, 20, 25, 30)
    """values of N in the sweep"""
    sweep_seeds: int = 3
    """seeds 1..S per (algorithm, N)"""
    sweep_lrs: tuple[str, ...] = ("1e-2", "table4")
    """learning-rate settings of the sweep (see LR_SETTINGS): 1e-2 for both networks, or Table 4's rates"""
    workers: int = 0
    """parallel processes for the sweep (0: one per CPU core)"""
    out_dir: str = "runs/bitflip_sweep"
    """where the sweep writes bitflip_sweep.csv and bitflip_sweep.png"""
    track: bool = True
    """write TensorBoard logs of a single run to runs/"""


class UsageError(ValueError):
    """A mistake in the command line, reported as one line before training."""


# ----------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------


class BitFlip:
    """num_games games of BitFlip(n_bits) stepped at once, with numpy arrays.

    Observation: float32 [n_bits + 1] = the bits, then the steps taken (0-5).
    All games start together and end together after 5 steps (terminated).
    """

    def __init__(self, n_bits: int, num_games: int, seed: Optional[int] = None):
        self.n_bits, self.num_games = n_bits, num_games
        self.rng = np.random.default_rng(seed)

    def reset(self) -> tuple[np.ndarray, dict]:
        self.bits = self.rng.integers(0, 2, (self.num_games, self.n_bits), dtype=np.int8)
        # At least 5 zeros (all bits when N <= 5): zero 5 random positions of each game.
        zeros = np.argsort(self.rng.random((self.num_games, self.n_bits)), axis=1)[:, :GAME_LENGTH]
        np.put_along_axis(self.bits, zeros, 0, axis=1)
        self.t = 0
        return self._obs(), {}

    def step(self, actions: np.ndarray):
        games = np.arange(self.num_games)
        reward = np.where(self.bits[games, actions] == 0, 1.0, -1.0)
        self.bits[games, actions] ^= 1
        self.t += 1
        terminated = np.full(self.num_games, self.t == GAME_LENGTH)
        return self._obs(), reward, terminated, np.zeros(self.num_games, bool), {}

    def _obs(self) -> np.ndarray:
        counter = np.full((self.num_games, 1), self.t)
        return np.concatenate([self.bits, counter], axis=1).astype(np.float32)


def optimal_return(n_bits: int) -> int:
    """Best return: each of the 5 flips changes the number of ones by +-1, so the
    return is an odd number at most min(5, zeros at the start) = min(5, N)."""
    best = min(GAME_LENGTH, n_bits)
    return best if best % 2 == 1 else best - 1


# ----------------------------------------------------------------------------
# The math: backups over all actions, TD(lambda) targets, the two actor losses
# ----------------------------------------------------------------------------


def backup_values(q: torch.Tensor, mu: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Backup F over all N actions, exact under mu(.|s) (Section 2.3).

    q, mu: [..., N]. What the sampled backups of the continuous case estimate,
    computed exactly: "mean" = E_mu Q = sum_a mu(a) Q(a); "max" = max of Q over
    the actions mu can take; "lse" = tau log E_mu exp(Q / tau), the limit of
    tau (logsumexp(Q(a_j) / tau) - log k) over k samples from mu.
    """
    if kind == "mean":
        return (mu * q).sum(-1)
    if kind == "max":
        return torch.where(mu > 0, q, -torch.inf).amax(-1)
    if kind == "lse":
        return tau * torch.logsumexp(q / tau + torch.log(mu), -1)
    raise ValueError(f"unknown backup {kind!r}")


def td_lambda_targets(rewards, bootstrap, terminated, last, gamma: float, lam: float) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices (App. 6.4).

    Inputs [..., T]: rewards, bootstrap values of the next states, terminated,
    last (the slice must stop there). Weights (1 - lam) lam^(n-1) on the
    n-step targets, the remainder lam^(T-1) on the T-step one; a terminated
    step stops bootstrapping and nothing after it is read.
    """
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def normalized_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(A / beta), max_weight), A normalised over the whole batch."""
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


def awr_actor_loss(logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AWR (Eq. 1, Algorithm 1 line 13): -mean xi(s, a) log pi(a|s) over buffer (s, a)."""
    log_pi = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    return -(weights * log_pi).mean()


def qwr_actor_loss(logits: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """QWR (Eq. 3) over all actions: -mean_s sum_a mu(a|s) xi(s, a) log pi(a|s)."""
    return -(mu * weights * torch.log_softmax(logits, -1)).sum(-1).mean()


# ----------------------------------------------------------------------------
# Networks, buffer, training
# ----------------------------------------------------------------------------


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two hidden layers of ReLU units."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


class EpisodeBuffer:
    """Whole games, [game, step] (every game is 5 steps); it keeps all the run collects."""

    def __init__(self, capacity: int, n_bits: int, device):
        self.device = device
        c = (capacity, GAME_LENGTH)
        self.obs = torch.zeros(c + (n_bits + 1,), device=device)
        self.action = torch.zeros(c, dtype=torch.long, device=device)
        self.reward = torch.zeros(c, device=device)
        self.mu = torch.zeros(c + (n_bits,), device=device)  # the sampling policy at each step
        self.size = 0

    def add(self, obs, action, reward, mu) -> None:
        """Tensors [games, 5, ...]; the buffer must have room (Args are checked)."""
        n = len(obs)
        for name, value in (("obs", obs), ("action", action), ("reward", reward), ("mu", mu)):
            getattr(self, name)[self.size: self.size + n] = value
        self.size += n

    def sample(self, batch_size: int, n_steps: int) -> dict:
        """Random (game, step) with the next n_steps steps of the same game."""
        ep = torch.randint(0, self.size, (batch_size,), device=self.device)
        t = torch.randint(0, GAME_LENGTH, (batch_size,), device=self.device)
        steps = t[:, None] + torch.arange(n_steps, device=self.device)  # [B, T]
        inside = steps.clamp(max=GAME_LENGTH - 1)
        following = (steps + 1).clamp(max=GAME_LENGTH - 1)
        ep2 = ep[:, None]
        return dict(
            obs=self.obs[ep, t], action=self.action[ep, t], mu=self.mu[ep, t],
            reward=self.reward[ep2, inside],
            terminated=steps >= GAME_LENGTH - 1,  # the 5th step ends the game
            next_obs=self.obs[ep2, following], next_mu=self.mu[ep2, following],
        )


@torch.no_grad()
def play(env: BitFlip, actor, device, greedy: bool):
    """One batch of games; returns obs, actions, rewards, mu as [games, 5, ...]."""
    obs, _ = env.reset()
    trace = []
    for _ in range(GAME_LENGTH):
        logits = actor(torch.as_tensor(obs, device=device))
        mu = torch.softmax(logits, -1)
        action = logits.argmax(-1) if greedy else torch.multinomial(mu, 1).squeeze(-1)
        next_obs, reward, _, _, _ = env.step(action.cpu().numpy())
        trace.append((torch.as_tensor(obs, device=device), action, torch.as_tensor(reward, device=device), mu))
        obs = next_obs
    return [torch.stack(x, 1) for x in zip(*trace)]


def check_args(args: Args) -> None:
    problems = [
        (args.n_bits < 1, "--n-bits must be >= 1"),
        (args.steps_per_iteration % GAME_LENGTH != 0, "--steps-per-iteration must be a multiple of 5"),
        (min(args.iterations, args.batch_size, args.n_steps, args.target_update_every) < 1,
         "--iterations, --batch-size, --n-steps and --target-update-every must be >= 1"),
        (min(args.critic_steps, args.actor_steps, args.eval_episodes) < 0, "step counts cannot be negative"),
        (not 0 <= args.td_lambda <= 1 or not 0 < args.gamma <= 1, "need 0 <= --td-lambda <= 1 and 0 < --gamma <= 1"),
        (min(args.beta, args.max_weight, args.tau, args.actor_lr, args.critic_lr) <= 0,
         "--beta, --max-weight, --tau and the learning rates must be > 0"),
        (args.sweep and (not args.sweep_n_bits or min(args.sweep_n_bits) < 1 or args.sweep_seeds < 1),
         "the sweep needs values of N >= 1 and --sweep-seeds >= 1"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def train(args: Args) -> dict:
    """Trains one agent under the protocol of Fig. 1; returns its metrics."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    n, qwr = args.n_bits, args.algo == "qwr"
    env = BitFlip(n, args.steps_per_iteration // GAME_LENGTH, seed=args.seed)
    actor = mlp(n + 1, args.hidden, n).to(device)
    critic = mlp(n + 1, args.hidden, n if qwr else 1).to(device)  # Q(s, .) for QWR, V(s) for AWR
    target = copy.deepcopy(critic).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    buffer = EpisodeBuffer(args.iterations * env.num_games, n, device)
    writer = None
    if args.track:
        from torch.utils.tensorboard import SummaryWriter

        run_name = f"BitFlip-{n}__{args.algo}__{args.seed}__{int(time.time())}"
        writer = SummaryWriter(f"runs/{run_name}")

    def state_value(net, obs, mu):
        """V(s): the critic's value, or QWR's backup of Q(s, .) under mu."""
        return backup_values(net(obs), mu, args.backup, args.tau) if qwr else net(obs).squeeze(-1)

    def lambda_returns(net, b):
        boot = state_value(net, b["next_obs"], b["next_mu"])
        return td_lambda_targets(b["reward"], boot, b["terminated"], b["terminated"], args.gamma, args.td_lambda)

    critic_loss = actor_loss = torch.tensor(float("nan"))
    start = time.time()
    for iteration in range(args.iterations):
        obs, action, reward, mu = play(env, actor, device, greedy=False)
        buffer.add(obs, action, reward, mu)
        train_return = reward.sum(1).mean().item()

        for i in range(args.critic_steps):  # Algorithm 1 lines 6-9 / Algorithm 2 lines 6-15
            if i % args.target_update_every == 0:
                target.load_state_dict(critic.state_dict())
            b = buffer.sample(args.batch_size, args.n_steps)
            with torch.no_grad():
                y = lambda_returns(target, b)
            pred = critic(b["obs"])
            pred = pred.gather(-1, b["action"][:, None]).squeeze(-1) if qwr else pred.squeeze(-1)
            critic_loss = (pred - y).pow(2).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()

        for _ in range(args.actor_steps):  # Algorithm 1 lines 10-14 / Algorithm 2 lines 16-22
            b = buffer.sample(args.batch_size, args.n_steps)
            with torch.no_grad():
                if qwr:  # A(s, a) = Q(s, a) - E_mu Q(s, .), for every action
                    q = critic(b["obs"])
                    weights = normalized_weights(q - (b["mu"] * q).sum(-1, keepdim=True), args.beta, args.max_weight)
                else:  # A(s, a) = R(s, a) - V(s), for the buffer's action only
                    adv = lambda_returns(critic, b) - critic(b["obs"]).squeeze(-1)
                    weights = normalized_weights(adv, args.beta, args.max_weight)
            logits = actor(b["obs"])
            if qwr:
                actor_loss = qwr_actor_loss(logits, b["mu"], weights)
            else:
                actor_loss = awr_actor_loss(logits, b["action"], weights)
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()

        if writer:
            step = (iteration + 1) * args.steps_per_iteration
            writer.add_scalar("charts/episodic_return", train_return, step)
            writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), step)

    eval_env = BitFlip(n, args.eval_episodes, seed=args.seed + 10_000)
    returns = {mode: play(eval_env, actor, device, greedy)[2].sum(1).mean().item()
               for mode, greedy in (("greedy", True), ("sampled", False))} if args.eval_episodes else {}
    metrics = dict(algo=args.algo, n_bits=n, seed=args.seed, eval_return=returns.get("greedy", float("nan")),
                   eval_return_sampled=returns.get("sampled", float("nan")), train_return=train_return,
                   optimal_return=optimal_return(n), critic_loss=critic_loss.item(), actor_loss=actor_loss.item(),
                   seconds=time.time() - start)
    if writer:
        writer.add_scalar("charts/eval_return", metrics["eval_return"], args.iterations * args.steps_per_iteration)
        writer.close()
    return metrics


# ----------------------------------------------------------------------------
# The sweep of Fig. 1
# ----------------------------------------------------------------------------


# (actor lr, critic lr) of the sweep's settings: the paper gives none for BitFlip (see Args.actor_lr).
LR_SETTINGS = {"1e-2": (1e-2, 1e-2), "table4": (1e-4, 5e-4)}
SWEEP_KEYS = ["lrs", "algo", "n_bits", "seed", "eval_return", "eval_return_sampled", "train_return",
              "optimal_return", "seconds"]


def _train_one_thread(args: Args) -> dict:
    torch.set_num_threads(1)  # one process per core
    return train(args)


def sweep(args: Args) -> list[dict]:
    """Both algorithms over N, seeds and learning-rate settings; writes a CSV, a PNG and prints a table.
    Rows already in the CSV are kept and not run again, so a stopped sweep resumes."""
    check_args(args)
    unknown = set(args.sweep_lrs) - set(LR_SETTINGS)
    if unknown:
        raise UsageError(f"--sweep-lrs: unknown setting(s) {sorted(unknown)}; choose from {list(LR_SETTINGS)}")
    path = os.path.join(args.out_dir, "bitflip_sweep.csv")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [dict(r, n_bits=int(r["n_bits"]), seed=int(r["seed"]),
                         **{k: float(r[k]) for k in ("eval_return", "eval_return_sampled", "seconds")})
                    for r in csv.DictReader(f)]
    else:
        with open(path, "w") as f:
            f.write(",".join(SWEEP_KEYS) + "\n")
    done = {(r["lrs"], r["algo"], r["n_bits"], r["seed"]) for r in rows}
    grid = [(lrs, replace(args, algo=algo, n_bits=n, seed=seed, actor_lr=LR_SETTINGS[lrs][0],
                          critic_lr=LR_SETTINGS[lrs][1], sweep=False, track=False))
            for lrs in args.sweep_lrs for n in args.sweep_n_bits for seed in range(1, args.sweep_seeds + 1)
            for algo in ("awr", "qwr") if (lrs, algo, n, seed) not in done]
    workers = args.workers or os.cpu_count() or 1
    print(f"{len(grid)} runs on {workers} processes ({len(rows)} done already in {path})")
    start = time.time()
    with ProcessPoolExecutor(workers) as pool:
        for i, ((lrs, _), m) in enumerate(zip(grid, pool.map(_train_one_thread, [g for _, g in grid]))):
            rows.append(m | dict(lrs=lrs))
            with open(path, "a") as f:  # one row per finished run
                f.write(",".join(str(rows[-1][k]) for k in SWEEP_KEYS) + "\n")
            print(f"[{i + 1}/{len(grid)}] lr {lrs} {m['algo']} N={m['n_bits']} seed={m['seed']}: return "
                  f"{m['eval_return']:.1f} greedy, {m['eval_return_sampled']:.1f} sampled ({m['seconds']:.1f} s)",
                  flush=True)

    def stats(lrs, algo, n, key):
        return np.array([m[key] for m in rows if (m["lrs"], m["algo"], m["n_bits"]) == (lrs, algo, n)])

    print(f"\nmean return of {args.eval_episodes} games after {args.iterations} iterations, greedy / sampled, "
          f"mean over {args.sweep_seeds} seeds ({(time.time() - start) / 60:.1f} min)")
    print("| N | optimum | " + " | ".join(f"{a} (lr {lrs})" for lrs in args.sweep_lrs for a in ("AWR", "QWR"))
          + " |\n" + "|---" * (2 + 2 * len(args.sweep_lrs)) + "|")
    for n in args.sweep_n_bits:
        cells = [f"{stats(lrs, a, n, 'eval_return').mean():.1f} / {stats(lrs, a, n, 'eval_return_sampled').mean():.1f}"
                 for lrs in args.sweep_lrs for a in ("awr", "qwr")]
        print(f"| {n} | {optimal_return(n)} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array(args.sweep_n_bits)
    fig, axes = plt.subplots(1, len(args.sweep_lrs), figsize=(5 * len(args.sweep_lrs), 4), sharey=True, squeeze=False)
    for ax, lrs in zip(axes[0], args.sweep_lrs):
        for algo, color in (("awr", "tab:red"), ("qwr", "tab:blue")):
            for key, style, label in (("eval_return", "o-", "greedy"), ("eval_return_sampled", "s:", "sampled")):
                mean, lo, hi = (np.array([f(stats(lrs, algo, n, key)) for n in ns]) for f in (np.mean, np.min, np.max))
                ax.plot(ns, mean, style, color=color, label=f"{algo.upper()} {label}")
                if key == "eval_return":
                    ax.fill_between(ns, lo, hi, color=color, alpha=0.2)
        ax.plot(ns, [optimal_return(n) for n in ns], "k--", lw=1, label="optimum")
        actor_lr, critic_lr = LR_SETTINGS[lrs]
        ax.set(xlabel="N (bits)", ylabel="mean return", title=f"actor lr {actor_lr:g}, critic lr {critic_lr:g}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"BitFlip, {args.sweep_seeds} seeds (band: min-max of greedy)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "bitflip_sweep.png"), dpi=120)
    print(f"wrote {path} and bitflip_sweep.png")
    return rows


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        if cli_args.sweep:
            sweep(cli_args)
        else:
            result = train(cli_args)
            print(f"{result['algo'].upper()} on BitFlip-{result['n_bits']} (seed {result['seed']}): "
                  f"mean return {result['eval_return']:.2f} greedy, {result['eval_return_sampled']:.2f} sampled "
                  f"(optimum {result['optimal_return']}), {result['seconds']:.1f} s")
    except UsageError as e:
        sys.exit(f"error: {e}")
