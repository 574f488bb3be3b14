"""How fast each script's training iteration runs here, eager and compiled, against the machine's limit.

    python benchmarks/speed.py                      # every script that has --compile, on this machine
    python benchmarks/speed.py --readme docs/speed.md   # and rewrite the speed block there

For each script, in one process: the seconds one training iteration takes (its environment steps
and its gradient steps, as `train` runs them; evaluation not included) eager and through
torch.compile, the two measured in alternating rounds so that both see the same machine; the
gradient steps per second; and the fraction of the machine they use: their floating-point
operations per second (counted with torch's FlopCounterMode on one eager step) over the FLOP/s
of large float32 matrix multiplies, measured in the same run with the same threads. Writes
benchmarks/results/speed-cpu.md (or speed-cuda.md) with the date and the machine, and with --readme
the block for that device in the file --readme names (docs/speed.md).
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_limit(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matrix multiply, the best of `repeats`."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def time_modes(modes: dict, run, device: torch.device, rounds: int, steps: int) -> dict:
    """Median seconds per step of run(fns, steps) for each mode's fns, the modes in alternating rounds."""
    per_step = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, fns in modes.items():
            sync(device)
            start = time.perf_counter()
            run(fns, steps)
            sync(device)
            per_step[mode].append((time.perf_counter() - start) / steps)
    return {mode: statistics.median(v) for mode, v in per_step.items()}


def measure(updates, eager, compile_fns, device: torch.device, rounds: int, steps: int, more=None) -> dict:
    """What a script's row needs from updates(fns, n), n gradient steps with the step functions fns:
    the FLOPs of one eager step, the seconds compile_fns(eager) takes to compile (3 steps), and
    the seconds per step eager and compiled, and in the same rounds with each of `more`'s fns."""
    with FlopCounterMode(display=False) as counter:
        updates(eager, 1)
    start = time.perf_counter()
    fast = compile_fns(eager)
    updates(fast, 3)
    compile_seconds = time.perf_counter() - start
    more = more or {}
    for fns in more.values():
        updates(fns, 3)
    step = time_modes({"eager": eager, "compiled": fast, **more}, updates, device, rounds, steps)
    return dict(flops=counter.get_total_flops(), compile_seconds=compile_seconds, step=step)


def bench_qwr_continuous(device: torch.device, rounds: int, steps: int) -> dict:
    """qwr_continuous.py on Walker2d-v4 at its defaults: 1000 env steps, 1000 critic and 1000 actor steps."""
    import qwr_continuous as qwr

    args = qwr.Args(env_id="Walker2d-v4")
    envs = qwr.make_vec_env(args, 1)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    actor = qwr.Actor(obs_dim, act_dim).to(device)
    norm = qwr.ObsNormalizer(obs_dim, args.obs_norm_sample_limit, args.obs_clip).to(device)
    critic = qwr.QNetwork(obs_dim, -torch.ones(act_dim, device=device), torch.ones(act_dim, device=device), args)
    critic.to(device)
    target = qwr.copy.deepcopy(critic)
    actor_opt, critic_opt = (torch.optim.Adam(n.parameters(), lr=1e-4, eps=1e-5) for n in (actor, critic))
    buffer = qwr.ReplayBuffer(args.buffer_size, 1, obs_dim, act_dim, device)
    obs, _ = envs.reset(seed=0)
    collect_seconds = []
    for _ in range(5):  # a replay buffer of real steps, and the time collection takes
        start = time.perf_counter()
        rollout, obs, _ = qwr.collect(envs, obs, args.steps_per_iteration, actor, norm, args.action_std, device)
        collect_seconds.append(time.perf_counter() - start)
        norm.update(rollout["obs"])
        buffer.add(rollout)
    envs.close()

    def updates(fns, n: int) -> None:  # n critic and n actor steps, as train's loop takes them
        for _ in range(n):
            fns[0](args, buffer.sample(args.batch_size, args.target_horizon), critic, target, critic_opt, norm)
            fns[1](args, buffer.sample(args.batch_size, 1), actor, critic, actor_opt, norm)

    def compile_fns(fns):  # as --compile does
        torch._inductor.config.fallback_random = True
        return tuple(torch.compile(f) for f in fns)

    m = measure(updates, (qwr.critic_step, qwr.actor_step), compile_fns, device, rounds, steps)
    collect = statistics.median(collect_seconds)
    return dict(script="qwr_continuous.py", task="Walker2d-v4", updates_per_step=2, **m,
                iteration={mode: collect + args.critic_steps * s for mode, s in m["step"].items()})


def bench_iq_continuous(device: torch.device, rounds: int, steps: int) -> dict:
    """iq_continuous.py on HalfCheetah-v4 (M-IQ, multicategorical) at its defaults: an iteration is
    1000 environment steps, each followed by one gradient step (Section 6)."""
    import iq_continuous as iq

    args = iq.Args(env_id="HalfCheetah-v4")
    env = iq.make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    nets = iq.make_networks(args, obs_dim, act_dim).to(device)
    optimizer = torch.optim.Adam([*nets.policy.parameters(), *nets.value.parameters()], lr=args.learning_rate)
    buffer = iq.ReplayBuffer(10_000, obs_dim, act_dim, torch.long, device)
    low, high = env.action_space.low, env.action_space.high
    obs, _ = env.reset(seed=0)
    start = time.perf_counter()
    for i in range(2000):  # the policy acting: the environment's share of an iteration (the second half timed)
        if i == 1000:
            start = time.perf_counter()
        action = nets.policy.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))
        next_obs, reward, terminated, truncated, _ = env.step(iq.to_env_action(args, action, low, high))
        buffer.add(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    act_seconds = time.perf_counter() - start
    env.close()

    def updates(fn, n: int) -> None:
        for _ in range(n):
            fn(args, buffer.sample(args.batch_size), nets, optimizer)

    def compile_fn(fn):  # as --compile does
        torch._inductor.config.fallback_random = True
        return torch.compile(fn)

    m = measure(updates, iq.update_step, compile_fn, device, rounds, steps)
    return dict(script="iq_continuous.py", task="HalfCheetah-v4", updates_per_step=1, **m,
                iteration={mode: act_seconds + 1000 * s for mode, s in m["step"].items()})


def bench_awr_continuous(device: torch.device, rounds: int, steps: int) -> dict:
    """awr_continuous.py on Walker2d-v4 with the authors' settings: an iteration collects 2048 steps,
    computes the buffer's TD(lambda) returns twice, then takes 200 critic and 1000 actor steps."""
    import awr_continuous as awr

    args = awr.Args(env_id="Walker2d-v4", **awr.authors_setting("Walker2d-v4"))
    envs = awr.make_vec_env(args.env_id, 1)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    actor, critic = awr.Actor(obs_dim, act_dim).to(device), awr.Critic(obs_dim, args.gamma).to(device)
    norm = awr.ObsNormalizer(obs_dim, args.obs_norm_sample_limit).to(device)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=args.actor_lr, momentum=args.momentum)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=args.critic_lr, momentum=args.momentum)
    buffer = awr.ReplayBuffer(args.buffer_size, 1, obs_dim, act_dim, device)
    obs, _ = envs.reset(seed=0)
    seconds = []  # collecting an iteration's steps and computing the returns twice, as train does
    for _ in range(5):
        start = time.perf_counter()
        rollout, obs, _ = awr.collect(envs, obs, args.samples_per_iteration, actor, norm, args.action_std, device)
        norm.update(rollout["obs"])
        buffer.add(rollout)
        for _ in range(2):
            states, actions, values, returns = awr.buffer_returns(args, buffer, critic, norm)
        seconds.append(time.perf_counter() - start)
    envs.close()
    weights = awr.advantage_weights(returns - values, args.beta, args.max_weight)

    def updates(fns, n: int) -> None:  # n critic and n actor steps, as train's loops take them
        for _ in range(n):
            i = torch.randint(0, len(states), (args.batch_size,), device=device)
            fns[0](args, critic, critic_opt, norm, states[i], returns[i])
        for _ in range(n):
            i = torch.randint(0, len(states), (args.batch_size,), device=device)
            fns[1](args, actor, actor_opt, norm, states[i], actions[i], weights[i])

    def compile_fns(fns):  # as --compile does
        torch._inductor.config.fallback_random = True
        return tuple(torch.compile(f) for f in fns)

    # A step: a critic and an actor step, timed together as a pair.
    m = measure(updates, (awr.critic_step, awr.actor_step), compile_fns, device, rounds, steps)
    # An iteration's 200 critic and 1000 actor steps, at the pair's mean time per step.
    n_updates = args.critic_steps + args.actor_steps
    return dict(script="awr_continuous.py", task="Walker2d-v4", updates_per_step=2, **m,
                iteration={mode: statistics.median(seconds) + n_updates * s / 2 for mode, s in m["step"].items()})


def bench_qwr_atari(device: torch.device, rounds: int, steps: int) -> dict:
    """qwr_atari.py on Breakout at its defaults: 1000 interactions, 1000 critic and 1000 actor steps
    (batch 256, 3-step targets). Its steps are slow on a CPU: a tenth of --steps per round."""
    import numpy as np

    import qwr_atari as qa

    args = qa.Args()
    envs = qa.make_vec_env(args, 1)
    n_actions = envs.single_action_space.n

    def networks(memory_format=torch.contiguous_format):  # actor, critic, target and their optimisers
        torch.manual_seed(0)
        actor = qa.Actor(n_actions, args.torso).to(device, memory_format=memory_format)
        critic = qa.QNetwork(n_actions, args).to(device, memory_format=memory_format)
        return (actor, critic, qa.copy.deepcopy(critic).requires_grad_(False),
                torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=1e-5),
                torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5))

    actor, critic, target, actor_opt, critic_opt = nets = networks()
    buffer = qa.FrameReplayBuffer(args.buffer_size, 1, n_actions, device)
    obs, _ = envs.reset(seed=0)
    buffer.push_frames(obs[:, -1], np.arange(1), new_episode=True)
    collect_seconds = []
    for _ in range(3):  # a replay buffer of real frames, and the time collection takes
        start = time.perf_counter()
        obs, _ = qa.collect(envs, obs, args.steps_per_iteration, actor, buffer, device)
        collect_seconds.append(time.perf_counter() - start)
    envs.close()

    def updates(fns, n: int) -> None:  # n critic and n actor steps, as train's loop takes them (fns[2]'s networks)
        actor, critic, target, actor_opt, critic_opt = fns[2] if len(fns) > 2 else nets
        for _ in range(n):
            fns[0](args, buffer.sample(args.batch_size, args.target_horizon), critic, target, critic_opt)
            fns[1](args, buffer.sample(args.batch_size, 1), actor, critic, actor_opt)

    def compile_fns(fns):  # as --compile does
        torch._inductor.config.fallback_random = True
        return tuple(torch.compile(f) for f in fns)

    def autocast(fn):  # the step under torch.autocast to bfloat16: convolutions and matmuls in bfloat16
        def step(*a):
            with torch.autocast(device.type, torch.bfloat16):
                return fn(*a)
        return step

    # A step: a critic and an actor step. Other modes, compiled: bfloat16 autocast; channels-last weights.
    step_fns = (qa.critic_step, qa.actor_step)
    more = {"bf16 autocast": compile_fns(tuple(autocast(f) for f in step_fns)),
            "channels-last": (*compile_fns(step_fns), networks(torch.channels_last))}
    m = measure(updates, step_fns, compile_fns, device, rounds, max(1, steps // 10), more)
    return dict(script="qwr_atari.py", task="Breakout", updates_per_step=2, **m,
                iteration={mode: statistics.median(collect_seconds) + args.critic_steps * s
                           for mode, s in m["step"].items()})


def bench_emaq_offline(device: torch.device, rounds: int, steps: int) -> list[dict]:
    """emaq_offline.py's Q updates (N = 10 actions from mu per next state), at Table 2's sizes on
    Hopper's dimensions (a fiftieth of --steps per round on a CPU) and at the emaq-n grid's size on
    Pendulum's; random transitions stand in for a dataset (the speed does not depend on them)."""
    import emaq_offline as emaq

    settings = [("Hopper dims, Table 2 sizes", 11, 3, emaq.Args(), steps if device.type == "cuda" else steps // 50),
                ("Pendulum dims, emaq-n sizes", 3, 1, emaq.Args(q_hidden=64, mu_embed=64, mu_hidden=64, batch_size=100),
                 steps)]
    results = []
    for task, obs_dim, act_dim, args, n_steps in settings:
        learner = emaq.make_learner(args, obs_dim, emaq.gym.spaces.Box(-1, 1, (act_dim,)), device)
        n = 10_000
        data = dict(obs=torch.randn(n, obs_dim, device=device), next_obs=torch.randn(n, obs_dim, device=device),
                    action=torch.rand(n, act_dim, device=device) * 2 - 1, reward=torch.randn(n, device=device),
                    terminated=torch.rand(n, device=device) < 0.01)

        def updates(fn, k: int) -> None:  # k Q updates, as train's loop takes them
            for _ in range(k):
                fn(args, emaq.sample(data, args.batch_size), learner)

        def compile_fn(fn):  # as --compile does
            torch._inductor.config.fallback_random = True
            return torch.compile(fn)

        m = measure(updates, emaq.q_step, compile_fn, device, rounds, max(1, n_steps))
        results.append(dict(script="emaq_offline.py", task=task, updates_per_step=1, **m,
                            iteration={mode: 1000 * s for mode, s in m["step"].items()}))
    return results


BENCHES = {"qwr_continuous.py": bench_qwr_continuous, "iq_continuous.py": bench_iq_continuous,
           "awr_continuous.py": bench_awr_continuous, "qwr_atari.py": bench_qwr_atari,
           "emaq_offline.py": bench_emaq_offline}


def machine(device: torch.device) -> str:
    from run import machine as cores_and_gpu  # benchmarks/run.py's description of this machine

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (GPU)"
    return f"{cores_and_gpu()}, {torch.get_num_threads()} torch threads"


def table(results: list[dict], limit: float, device: torch.device) -> str:
    lines = [f"Measured {datetime.date.today().isoformat()} on {machine(device)}, torch {torch.__version__}; "
             f"the machine's limit: {limit / 1e9:.0f} GFLOP/s (2048 x 2048 float32 matrix multiply).", "",
             "| script | task | device | s / iteration, eager | s / iteration, compiled | speed-up | "
             "other modes, compiled: s / iteration, speed-up | "
             "updates / s, compiled | GFLOP / update | share of the limit, eager / compiled | compile time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        share = {m: r["flops"] / s / limit for m, s in r["step"].items()}
        it = r["iteration"]
        others = "; ".join(f"{m}: {s:.1f}, {it['eager'] / s:.2f}x" for m, s in it.items()
                           if m not in ("eager", "compiled")) or "–"
        lines.append(
            f"| {r['script']} | {r['task']} | {device.type} | {it['eager']:.1f} | "
            f"{it['compiled']:.1f} | {it['eager'] / it['compiled']:.2f}x | {others} | "
            f"{r['updates_per_step'] / r['step']['compiled']:.0f} | {r['flops'] / r['updates_per_step'] / 1e9:.2f} | "
            f"{share['eager']:.0%} / {share['compiled']:.0%} | "
            f"{r['compile_seconds']:.0f} s |")
    lines += ["", "An iteration, evaluation not included: for qwr_continuous.py what `train` does between two "
              "logging lines (1000 environment steps, then 1000 critic and 1000 actor steps), an update being one "
              "critic or one actor step; for iq_continuous.py 1000 environment steps, each followed by its "
              "update; for awr_continuous.py 2048 environment steps, the buffer's returns twice, 200 critic and "
              "1000 actor steps (at the mean time of a critic and an actor step); for qwr_atari.py 1000 "
              "interactions, then 1000 critic and 1000 actor steps; for emaq_offline.py 1000 Q updates (batch 256 at "
              "Table 2's sizes, 100 at the emaq-n grid's). Speed-ups are over eager. Compiled: --compile, "
              "torch.compile's default mode. Other modes (qwr_atari.py): bfloat16 autocast, channels-last weights, both compiled."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU (default: the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating eager / compiled rounds")
    parser.add_argument("--steps", type=int, default=200, help="critic and actor steps per round")
    parser.add_argument("--readme", type=Path, help="also replace this device's block there")
    parser.add_argument("--scripts", nargs="+", choices=list(BENCHES), default=list(BENCHES),
                        help="only these scripts (not with --readme: its table has them all)")
    a = parser.parse_args()
    if a.readme and a.scripts != list(BENCHES):
        parser.error("--readme needs every script measured")
    device = torch.device("cuda" if a.cuda else "cpu")
    start, end = f"<!-- benchmarks/speed.py {device.type}: start -->", f"<!-- benchmarks/speed.py {device.type}: end -->"
    torch.manual_seed(0)
    limit = matmul_limit(device)
    results = []
    for script, bench in ((s, BENCHES[s]) for s in a.scripts):
        print(f"{script} ...", flush=True)
        out = bench(device, a.rounds, a.steps)
        results += out if isinstance(out, list) else [out]
    limit = max(limit, matmul_limit(device))  # measured again after the runs, the better of the two
    text = table(results, limit, device)
    print(text)
    if a.scripts == list(BENCHES):  # (a partial run only prints)
        (RESULTS / f"speed-{device.type}.md").write_text(f"# Speed ({device.type})\n\n{text}\n")
    if a.readme:
        readme = a.readme.read_text()
        if start not in readme or end not in readme:
            raise SystemExit(f"error: {a.readme} has no {start} ... {end} block to replace")
        head, rest = readme.split(start, 1)
        a.readme.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
        print(f"updated {a.readme}")


if __name__ == "__main__":
    main()
