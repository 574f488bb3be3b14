"""BitFlip: the QWR paper's experiment where AWR fails and QWR does not (Fig. 1).

BitFlip(N) (../shared/papers/qwr.md, Section 2.2): the state is N bits and a step counter; action i
flips bit i, for +1 if it turned a 0 into a 1 and -1 otherwise; a game lasts 5 steps from a random
start with at least 5 zeros, so the best return is 5. With 2^N start states, a replay buffer almost
never holds a state twice: it satisfies "state determines action", under which the AWR actor can
only clone the buffer (Theorems 1-2), while the QWR actor moves towards mu(a|s) exp(A(s, a) / beta)
(Theorem 3).

Both algorithms are here with every hyper-parameter shared (Fig. 1's protocol: 10 iterations of
1000 interactions, 300 critic and 300 actor steps; Table 4 where it applies; learning rates 1e-2,
see Args.actor_lr): AWR (Algorithm 1) with a value critic V(s) and advantages of the buffer's
actions; QWR (Algorithm 2) with the mean backup and a Q critic. With discrete actions QWR needs no
sampling: the critic has one output per action, and the backup and the actor loss sum exactly over
the N actions weighted by the stored mu (what the authors' code does when k = N). The sweep over N
of Fig. 1 is benchmarks/bitflip_sweep.py.

    python bitflip.py --algo qwr --n-bits 20
"""

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

GAME_LENGTH = 5


@dataclass
class Args:
    algo: Literal["qwr", "awr"] = "qwr"  # QWR (Q critic, mu-weighted actor over all actions) or AWR (V critic)
    n_bits: int = 20  # N, the number of bits (and of actions)
    seed: int = 1  # seed of python, numpy, torch and the games
    torch_deterministic: bool = True  # make torch's algorithms deterministic (same seed, same numbers)
    cuda: bool = False  # run the networks on CUDA if available (CPU is faster at this size)
    track: bool = True  # write TensorBoard logs to runs/
    # Fig. 1's protocol
    iterations: int = 10  # iterations of collect / train critic / train actor
    steps_per_iteration: int = 1000  # interactions collected per iteration (200 games of 5 steps)
    critic_steps: int = 300  # critic gradient steps per iteration
    actor_steps: int = 300  # actor gradient steps per iteration
    eval_episodes: int = 10  # games played by the trained agent to report its mean return
    # Shared hyper-parameters (Table 4)
    batch_size: int = 256  # states per gradient step
    critic_lr: float = 1e-2  # Adam learning rate of the critic (see actor_lr)
    # The paper gives no learning rate for BitFlip; 1e-2 is the authors' (Trax) discrete-action AWR setting.
    # Fig. 1's collapse of AWR shows only with it: at Table 4's MuJoCo rates (1e-4 and 5e-4) the networks do
    # not memorise the buffer in 3000 steps, the condition Appendix 6.2 names for AWR's failure. The sweep
    # (benchmarks/bitflip_sweep.py) runs both; docs/bitflip.md.
    actor_lr: float = 1e-2  # Adam learning rate of the actor
    target_update_every: int = 100  # critic steps between copies of the critic into its target
    gamma: float = 0.99  # discount factor
    td_lambda: float = 0.95  # lambda of the TD(lambda) mix of the 1..T-step targets
    n_steps: int = 3  # T, horizon of the multi-step targets
    beta: float = 1.0  # temperature of the advantage weights exp(A / beta)
    max_weight: float = 20.0  # advantage weights are clipped at this value
    hidden: int = 256  # width of the two hidden layers of both networks
    backup: Literal["mean", "max", "lse"] = "mean"  # QWR's backup over the actions (the paper's BitFlip: mean)
    tau: float = 0.3  # temperature of the lse backup


# The environment
class BitFlip:
    """num_games games of BitFlip(n_bits) stepped at once, with numpy arrays. Observation: float32
    [n_bits + 1] = the bits, then the steps taken (0-5). All games start together and end together
    after 5 steps (terminated)."""

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
    """Best return: each of the 5 flips changes the number of ones by +-1, so the return is an odd
    number at most min(5, zeros at the start) = min(5, N)."""
    best = min(GAME_LENGTH, n_bits)
    return best if best % 2 == 1 else best - 1


# The math: backups over all actions, TD(lambda) targets, the two actor losses (tests/ check them)
def backup_values(q: torch.Tensor, mu: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Backup F over all N actions, exact under mu(.|s) (Section 2.3); q, mu: [..., N]. What the
    sampled backups of the continuous case estimate: "mean" = E_mu Q = sum_a mu(a) Q(a); "max" = max
    of Q over the actions mu can take; "lse" = tau log E_mu exp(Q / tau), the limit of
    tau (logsumexp(Q(a_j) / tau) - log k) over k samples from mu."""
    if kind == "mean":
        return (mu * q).sum(-1)
    if kind == "max":
        return torch.where(mu > 0, q, -torch.inf).amax(-1)
    return tau * torch.logsumexp(q / tau + torch.log(mu), -1)


def td_lambda_targets(rewards, bootstrap, terminated, last, gamma: float, lam: float) -> torch.Tensor:
    """Truncated TD(lambda) target of the first step of T-step slices (Appendix 6.4). Inputs [..., T]:
    rewards, bootstrap values of the next states, terminated, last (the slice stops there). Weights
    (1 - lam) lam^(n-1) on the n-step targets, the remainder lam^(T-1) on the T-step one; a terminated
    step stops bootstrapping and nothing after it is read."""
    ret = None
    for t in reversed(range(rewards.shape[-1])):
        cont = bootstrap[..., t]
        if ret is not None:
            cont = torch.where(last[..., t], cont, (1 - lam) * cont + lam * ret)
        ret = rewards[..., t] + gamma * torch.where(terminated[..., t], 0.0, cont)
    return ret


def normalized_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(A / beta), max_weight), A normalised over the whole batch (Appendix 6.1)."""
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)
    return torch.exp(torch.clamp(adv / beta, max=math.log(max_weight)))


def awr_actor_loss(logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AWR (Eq. 1, Algorithm 1 line 13): -mean xi(s, a) log pi(a|s) over the buffer's (s, a)."""
    log_pi = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    return -(weights * log_pi).mean()


def qwr_actor_loss(logits: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """QWR (Eq. 3) over all actions: -mean_s sum_a mu(a|s) xi(s, a) log pi(a|s)."""
    return -(mu * weights * torch.log_softmax(logits, -1)).sum(-1).mean()


# Networks, buffer, playing
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


class EpisodeBuffer:
    """Whole games as [game, step] (every game is 5 steps); it keeps all that the run collects."""

    def __init__(self, capacity: int, n_bits: int, device):
        self.device = device
        c = (capacity, GAME_LENGTH)
        self.obs = torch.zeros(c + (n_bits + 1,), device=device)
        self.action = torch.zeros(c, dtype=torch.long, device=device)
        self.reward = torch.zeros(c, device=device)
        self.mu = torch.zeros(c + (n_bits,), device=device)  # the sampling policy at each step
        self.size = 0

    def add(self, obs, action, reward, mu) -> None:
        """Tensors [games, 5, ...]."""
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
        return dict(obs=self.obs[ep, t], action=self.action[ep, t], mu=self.mu[ep, t],
                    reward=self.reward[ep2, inside],
                    terminated=steps >= GAME_LENGTH - 1,  # the 5th step ends the game
                    next_obs=self.obs[ep2, following], next_mu=self.mu[ep2, following])


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
    """Impossible flags, each as one line, before training."""
    for bad, message in [
        (args.n_bits < 1, "--n-bits must be >= 1"),
        (args.steps_per_iteration < GAME_LENGTH or args.steps_per_iteration % GAME_LENGTH,
         "--steps-per-iteration must be a positive multiple of 5"),
        (min(args.iterations, args.batch_size, args.n_steps, args.target_update_every, args.eval_episodes) < 1,
         "--iterations, --batch-size, --n-steps, --target-update-every and --eval-episodes must be >= 1"),
        (min(args.beta, args.max_weight, args.tau, args.actor_lr, args.critic_lr) <= 0,
         "--beta, --max-weight, --tau and the learning rates must be > 0"),
    ]:
        if bad:
            raise SystemExit(f"error: {message}")


def lambda_returns(args: Args, net, b: dict) -> torch.Tensor:
    """TD(lambda) targets of the slices b, bootstrapping with net at s': V(s') for AWR, QWR's backup of
    Q(s', .) under the stored mu at s' (a game's end is terminal: no time limit to bootstrap through)."""
    q = net(b["next_obs"])
    boot = backup_values(q, b["next_mu"], args.backup, args.tau) if args.algo == "qwr" else q.squeeze(-1)
    return td_lambda_targets(b["reward"], boot, b["terminated"], b["terminated"], args.gamma, args.td_lambda)


def critic_loss_of(args: Args, b: dict, critic, target) -> torch.Tensor:
    """Alg. 1 l.8 / Alg. 2 l.13-14: (Q(s, a) or V(s) - y)^2, y the target network's TD(lambda) targets."""
    with torch.no_grad():
        y = lambda_returns(args, target, b)
    pred = critic(b["obs"])
    pred = pred.gather(-1, b["action"][:, None]).squeeze(-1) if args.algo == "qwr" else pred.squeeze(-1)
    return (pred - y).pow(2).mean()


def actor_loss_of(args: Args, b: dict, actor, critic) -> torch.Tensor:
    """Alg. 1 l.12-13 / Alg. 2 l.19-21 with the online critic: QWR weighs every action by mu and
    exp(A / beta), A = Q(s, a) - E_mu Q(s, .); AWR weighs the buffer's action, A = R(s, a) - V(s)."""
    with torch.no_grad():
        if args.algo == "qwr":
            q = critic(b["obs"])
            weights = normalized_weights(q - (b["mu"] * q).sum(-1, keepdim=True), args.beta, args.max_weight)
        else:
            adv = lambda_returns(args, critic, b) - critic(b["obs"]).squeeze(-1)
            weights = normalized_weights(adv, args.beta, args.max_weight)
    logits = actor(b["obs"])
    if args.algo == "qwr":
        return qwr_actor_loss(logits, b["mu"], weights)
    return awr_actor_loss(logits, b["action"], weights)


def train(args: Args) -> dict:
    """Trains one agent under Fig. 1's protocol; returns its metrics."""
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    n, qwr = args.n_bits, args.algo == "qwr"
    env = BitFlip(n, args.steps_per_iteration // GAME_LENGTH, seed=args.seed)
    # Alg. 1-2 l.1-3: random actor and critic, an empty buffer (it keeps every game of the run).
    actor = mlp(n + 1, args.hidden, n).to(device)
    critic = mlp(n + 1, args.hidden, n if qwr else 1).to(device)  # Q(s, .) for QWR, V(s) for AWR
    target = copy.deepcopy(critic).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    buffer = EpisodeBuffer(args.iterations * env.num_games, n, device)
    writer = None
    if args.track:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(f"runs/BitFlip-{n}__{args.algo}__{args.seed}__{int(time.time())}")

    critic_loss = actor_loss = torch.tensor(float("nan"))  # (with --critic-steps or --actor-steps 0)
    start = time.time()
    for iteration in range(args.iterations):  # Alg. 1-2 l.4
        obs, action, reward, mu = play(env, actor, device, greedy=False)  # Alg. 1-2 l.5, with the mu of each step
        buffer.add(obs, action, reward, mu)
        train_return = reward.sum(1).mean().item()

        for i in range(args.critic_steps):  # Alg. 1 l.6-9 / Alg. 2 l.6-15
            if i % args.target_update_every == 0:
                target.load_state_dict(critic.state_dict())
            critic_loss = critic_loss_of(args, buffer.sample(args.batch_size, args.n_steps), critic, target)
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()

        for _ in range(args.actor_steps):  # Alg. 1 l.10-14 / Alg. 2 l.16-22
            actor_loss = actor_loss_of(args, buffer.sample(args.batch_size, args.n_steps), actor, critic)
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()

        if writer:
            step = (iteration + 1) * args.steps_per_iteration
            writer.add_scalar("charts/episodic_return", train_return, step)
            writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), step)

    eval_env = BitFlip(n, args.eval_episodes, seed=args.seed + 10_000)
    greedy, sampled = (play(eval_env, actor, device, g)[2].sum(1).mean().item() for g in (True, False))
    metrics = dict(algo=args.algo, n_bits=n, seed=args.seed, eval_return=greedy, eval_return_sampled=sampled,
                   train_return=train_return, optimal_return=optimal_return(n), critic_loss=critic_loss.item(),
                   actor_loss=actor_loss.item(), seconds=time.time() - start)
    if writer:
        writer.add_scalar("charts/eval_return", greedy, args.iterations * args.steps_per_iteration)
        writer.close()
    return metrics


if __name__ == "__main__":
    m = train(tyro.cli(Args))
    print(f"{m['algo'].upper()} on BitFlip-{m['n_bits']} (seed {m['seed']}): mean return {m['eval_return']:.2f} "
          f"greedy, {m['eval_return_sampled']:.2f} sampled (optimum {m['optimal_return']}), {m['seconds']:.1f} s")
