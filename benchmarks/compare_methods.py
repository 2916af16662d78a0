"""MixGRPO against its baselines, side by side: same tiny model, prompts, seeds and reward, one invocation.

    python benchmarks/compare_methods.py --quick                  # a few minutes: 4 iterations, 32 images/iter
    python benchmarks/compare_methods.py                          # default tiny job, 20 iterations per method
    python benchmarks/compare_methods.py --methods dance_grpo mixgrpo --iterations 10 --out /tmp/t.md
    python benchmarks/compare_methods.py --quick learner.num_threads=2     # dotted overrides apply to every variant
    python benchmarks/compare_methods.py --architecture sd3_5_medium --device cuda \
        --methods dance_grpo mixgrpo mixgrpo_flash mixgrpo_flash_star          # the paper's per-GPU work, timed
    python benchmarks/compare_methods.py --paper learner.num_threads=2        # the paper's shape, floors beside ratios
    python benchmarks/compare_methods.py --paper --rounds 2   # twice, interleaved (forward, backward): drift hits all alike

`--paper` runs the tiny model at the paper's per-iteration shape: N = 25, G = 12, 96 images (8 prompts) per
iteration, DanceGRPO training 14 of 25 steps (each row its own, as its reference), MixGRPO's reference window
(w = 4, stride 1) over 12 iterations with τ = 1 instead of 25: one iteration stands for each window start the
reference's 300 iterations at τ = 25 visit (0 … 11), so the timed iterations (after the warm-up at start 0) cover
starts 1 … 11. Flash* keeps its frozen window at [0, 4). Next to each ratio goes its floor
(`benchmarks/floors.py`): the ratio with zero overhead and every core busy, from unit costs measured in the same
invocation (`unit_costs`), and how far the measured time is above it (⚠ past 10 %).

`--architecture sd3_5_medium | flux_dev` times the paper's per-GPU work on a randomly initialised transformer of the
real architecture (`benchmarks/real_arch.py`; random weights cost what trained ones do): N = 25 steps, one group of
G = 12 images per iteration, 512 px (FLUX 720 px), DanceGRPO training 60 % of the steps (14 of 25 in the paper's
table), a cheap pixel reward (jpeg_incompressibility) so that the reward side stays out of the measurement, LoRA
as in the presets. The text encoders have their real widths but one layer each (a rollout encodes its prompt once).
`--arch-layers` shrinks the transformer for a CPU smoke test.

Each method runs through the real driver path (`learner.driver.loop.run_loop`: scheduler, rollout worker and
learner actors, the Serve reward deployments, weight broadcast, evaluations) one after another on one
local Ray, with the same run seed (prompts and noise), the same rewards and the same held-out evaluation.
From each run's metrics.jsonl the table gives:

- rollout NFE: sequential model evaluations along one trajectory (mean over iterations; Flash varies with
  the window), and image evals: model evaluations × batch rows per iteration (the compute spent, which the
  shared pre-window prefix lowers);
- steps trained per iteration: the window steps each row trains (DanceGRPO: each row its own 60 %);
- median seconds per iteration, skipping the first `--warmup` iterations, and its ratio to dance_grpo next
  to the paper's target for that method;
- reward gain: mean train reward of the last k iterations minus the first k (k = `--reward-k`);
- held-out verifier gain: the final evaluation minus the one before training (same prompts and noise); with
  `--architecture` the column holds the configured reward (there is no verifier), on the prompts file.

Timings on a shared two-core CPU are noisy; the ratios are only meaningful within one invocation. `--rounds R` runs
the methods R times in one invocation, in alternating order, pools the timed iterations of all rounds for s/iter
and prints each round's own ratio beside the pooled one, so the spread is in the table.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish  # noqa: E402 (needs the path above)
from benchmarks.compare_table import (  # noqa: E402
    BASELINE,
    markdown_table,
    summarize_rounds,
    unit_costs,
    with_floors,
    with_ratios,
)

# (label, preset, extra overrides); the label is the table row
VARIANTS = {
    "flow_grpo": ("flow_grpo", []),
    "dance_grpo": ("dance_grpo", []),
    "mixgrpo": ("mixgrpo", []),
    "mixgrpo_flash": ("mixgrpo_flash", []),
    "mixgrpo_flash_star": ("mixgrpo_flash_star", []),
    "mixgrpo_flash_star async": ("mixgrpo_flash_star", ["run.async_rollout=true"]),
    # the learner keeps its half of the cores after the overlapping rollout is done (before learner.overlap_threads)
    "mixgrpo_flash_star async fixed": ("mixgrpo_flash_star", ["run.async_rollout=true", "learner.overlap_threads=0"]),
    "mixgrpo async": ("mixgrpo", ["run.async_rollout=true"]),
    "flow_grpo_fast": ("flow_grpo_fast", []),
    "awm": ("awm", []),
    "diffusion_nft": ("diffusion_nft", []),
}
QUICK = {"iterations": 4, "batch_size": 32, "eval_prompts": 48, "reward_k": 1}
ARCH = {"iterations": 4, "batch_size": 12, "eval_prompts": 4, "reward_k": 1}
ARCH_PROMPTS = ["a cat sitting on a red chair", "a lighthouse on a cliff at dusk", "two apples on a wooden table",
                "an astronaut riding a horse", "a bowl of ramen with chopsticks", "a city street in the rain"]
FULL = {"iterations": 20, "batch_size": 64, "eval_prompts": 192, "reward_k": 5}
PAPER_SHAPE = {"iterations": 12, "batch_size": 96, "eval_prompts": 48, "reward_k": 3}
# N = 25, G = 12; the progressive window moves one start per iteration (module docstring)
PAPER_OVERRIDES = ["sampler.num_steps=25", "grpo.group_size=12", "window.shift_interval=1", "window.stride=1"]
PAPER_METHODS = ["dance_grpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "mixgrpo_flash_star async"]


def round_orders(labels: list[str], rounds: int) -> list[list[str]]:
    """The methods' order in each round: forward, then backward, alternately (A B C, C B A, A B C …), so a drift of
    the machine's speed over the invocation falls on every method alike."""
    return [list(labels) if r % 2 == 0 else list(reversed(labels)) for r in range(rounds)]


# (micro-batch, accumulation) of the learner: one optimizer step over the group's 12 samples either way. On a GPU
# in one micro-batch: at 3 samples per micro-batch an H200 ran MixGRPO's SD3.5-Medium update at 8.57 s against 2.76 s
# at 12 (4 December, benchmarks/README.md), small batches leaving it idle; on the CPU 3 keeps activations small.
LEARNER_MICRO_BATCH = {"cuda": (12, 1), "cpu": (3, 4)}


def architecture_overrides(architecture: str, folder: Path, prompts: Path, device: str) -> list[str]:
    """The per-GPU shape of the paper on `architecture`'s random-weight folder (module docstring)."""
    micro, accumulation = LEARNER_MICRO_BATCH[device]
    out = [f"model.path={folder}", f"rollout.prompts_file={prompts}", f"run.eval_prompts_file={prompts}",
           "sampler.num_steps=25", "grpo.group_size=12", "grpo.kl_beta=0", "rollout.num_workers=1",
           f"learner.micro_batch_size={micro}", f"learner.gradient_accumulation_steps={accumulation}",
           "reward.rewards=[{name: jpeg_incompressibility, num_cpus: 0.25}]"]
    if device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
        out += ["model.device=cuda", "rollout.num_gpus=0.5", "learner.num_gpus=0.5", "rollout.num_cpus=1",
                "learner.num_cpus=1", f"cluster.gpu_memory_gb={memory:.0f}"]
    else:
        out += ["model.device=cpu", "rollout.num_gpus=0", "learner.num_gpus=0", "rollout.num_cpus=0.5",
                "learner.num_cpus=0.5"]
    return out


# ---------------------------------------------------------------------------------- running
@contextmanager
def local_ray(num_cpus: int = 2):
    """A throwaway local Ray (no dashboard, worker logs kept in their files) with the repo importable."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace="mixgrpo-bench")
    try:
        yield
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_overrides(settings: dict, seed: int) -> list[str]:
    """What every variant shares: iterations, batch, evaluation, seed; no mid-run evaluations or checkpoints."""
    return [f"run.iterations={settings['iterations']}", f"rollout.batch_size={settings['batch_size']}",
            f"run.eval_prompts={settings['eval_prompts']}", "run.eval_every=0", f"run.seed={seed}",
            "learner.checkpoint_every=0", f"reward.server.port={free_port()}"]


def run_variants(labels: list[str], overrides: list[str], workdir: Path, presets: tuple[str, ...] = (),
                 num_cpus: int = 2, rounds: int = 1) -> dict[str, list[dict]]:
    """Each variant through `run_loop`, sequentially, on one local Ray with one reward deployment; with `rounds`
    R > 1 the whole list R times, in `round_orders` (forward, backward, …), each round in `workdir`/round<r>.

    Returns label → one dict per round: {"dir": run directory, "wall_min": minutes including start-up and
    evaluations, "load": 1-minute load average at start and end, "overlap": async, "rollout_cores" /
    "learner_cores": the threads each role runs, "rollout_workers" / "rollout_threads" (for the floors' unit costs
    and the workers' imbalance)}.
    """
    from learner.driver.loop import run_loop
    from reward_servers.service import reward_service
    from services.config import load_config

    def folder(label: str, r: int) -> Path:
        return (workdir if rounds == 1 else workdir / f"round{r}") / label.replace(" ", "_")

    # every (variant, round) config built and checked once, before the first run
    cfgs = {(label, r): load_config([*presets, VARIANTS[label][0]], [*overrides, *VARIANTS[label][1],
                                                                     f"run.output_dir={folder(label, r)}"])
            for r in range(rounds) for label in labels}
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    with local_ray(num_cpus), reward_service(cfgs[labels[0], 0].reward):  # all variants share the reward config
        for r, order in enumerate(round_orders(labels, rounds)):
            for label in order:
                cfg, out = cfgs[label, r], folder(label, r)
                load0, t0 = os.getloadavg()[0], time.perf_counter()
                print(f"== {label}{f' (round {r + 1} of {rounds})' if rounds > 1 else ''}: "
                      f"{cfg.run.iterations} iterations → {out}", flush=True)
                run_loop(cfg, out, f"bench-{label.replace(' ', '-')}-{int(time.time())}")
                if (out / "config.json").is_file():  # the thread counts the run resolved (num_threads 0 = auto)
                    cfg = load_config([out / "config.json"])
                runs[label].append({"dir": out, "wall_min": (time.perf_counter() - t0) / 60,
                                    "load": (load0, os.getloadavg()[0]), "overlap": cfg.run.async_rollout,
                                    "rollout_cores": cfg.rollout.num_workers * cfg.rollout.num_threads,
                                    "rollout_workers": cfg.rollout.num_workers,
                                    "rollout_threads": cfg.rollout.num_threads,
                                    "learner_cores": cfg.learner.num_workers * cfg.learner.num_threads})
    return runs


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.device_count()} × {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores{gpu}"


def report(rows: dict[str, dict], settings: dict, seed: int, mode: str, cores: float | None = None,
           rounds: int = 1) -> str:
    """The table under a header of the settings and the machine's load; with `cores`, the floors beside the ratios;
    with `rounds` > 1, how the rounds were run and where they disagree."""
    rows = with_ratios(rows)
    if cores:
        rows = with_floors(rows, cores)
    loads = ", ".join(f"{n} {r['load'][0]:.1f}→{r['load'][1]:.1f}" for n, r in rows.items())
    head = [f"{mode}: {settings['iterations']} iterations per method, {settings['batch_size']} images per iteration, "
            f"run seed {seed}, {settings['eval_prompts']} held-out prompts; median s/iter skips iteration 1; reward "
            f"gain = mean of the last {settings['reward_k']} iterations − the first {settings['reward_k']}.",
            f"Machine: {machine()}; 1-min load average at start→end of each method: {loads}.", ""]
    if rounds > 1:
        disagree = {n: r["rounds_disagree"] for n, r in rows.items() if r.get("rounds_disagree")}
        head[-1:] = [f"{rounds} rounds, interleaved (the methods in order, then in reverse, …): s/iter is the median "
                     f"of every round's timed iterations; × {BASELINE} in brackets is each round's own ratio. "
                     + (f"The rounds differ in {disagree} (the table shows the first round's)." if disagree else
                        "Work, rewards and held-out scores were the same in every round."), ""]
    if cores:
        c = unit_costs(rows)
        head[-1:] = [f"Floors on {cores:g} cores from unit costs pooled over the synchronous runs: "
                     f"c_eval = {1e3 * c.eval_s:.3f} ms, c_train = {1e3 * c.train_s:.3f} ms (core-seconds); "
                     "async floors split the cores (benchmarks/floors.py).", ""]
    return "\n".join(head) + "\n" + markdown_table(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 iterations, 32 images/iteration, 48 held-out prompts")
    p.add_argument("--paper", action="store_true",
                   help="the paper's shape (N = 25, G = 12, 96 images/iteration, the window sweep) with floors")
    p.add_argument("--methods", nargs="+", choices=list(VARIANTS), metavar="METHOD",
                   help=f"variants to run, in order (default: all; --paper: {', '.join(PAPER_METHODS)}): "
                        f"{', '.join(VARIANTS)}")
    p.add_argument("--iterations", type=int, help="override the mode's iterations per method")
    p.add_argument("--batch-size", type=int, help="override the mode's images per iteration")
    p.add_argument("--eval-prompts", type=int, help="override the mode's held-out prompts")
    p.add_argument("--reward-k", type=int, help="iterations averaged at each end for the reward gain")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the methods this many times, interleaved (forward, backward, …): times pooled, "
                        "ratios also per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="the table (default benchmarks/results/compare_methods.md; --paper: "
                                             "compare_methods_paper.md)")
    p.add_argument("--workdir", type=Path, help="run outputs (default runs/bench-compare-<timestamp>)")
    p.add_argument("--architecture", choices=["sd3_5_medium", "flux_dev"],
                   help="time the paper's per-GPU work on random weights of this real architecture")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="with --architecture: where models run")
    p.add_argument("--arch-layers", type=int, help="with --architecture: transformer blocks (smoke tests only)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every variant, e.g. rollout.num_workers=1")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.paper and (args.quick or args.architecture):
        p.error("--paper is its own shape: without --quick or --architecture (shrink it with --iterations …)")
    settings = dict(ARCH if args.architecture else PAPER_SHAPE if args.paper else QUICK if args.quick else FULL)
    for key in ("iterations", "batch_size", "eval_prompts", "reward_k"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    workdir = args.workdir or REPO_ROOT / "runs" / f"bench-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    from learner.outputs.report import load_records

    presets, extra, num_cpus, mode = (), [], 2, "quick" if args.quick else "full"
    methods = args.methods or (PAPER_METHODS if args.paper else list(VARIANTS))
    if args.paper:
        last = min(settings["iterations"] - 1, 25 - 1 - 4)  # the progressive window's start in the last iteration
        extra, mode = list(PAPER_OVERRIDES), f"paper shape (N = 25, G = 12, MixGRPO window starts 0 … {last}, τ = 1)"
    if args.architecture:
        from benchmarks.real_arch import build

        workdir.mkdir(parents=True, exist_ok=True)
        prompts = workdir / "prompts.txt"
        prompts.write_text("\n".join(ARCH_PROMPTS) + "\n")
        print(f"building a random-weight {args.architecture} pipeline in {workdir / 'model'}", flush=True)
        folder = build(args.architecture, workdir / "model", transformer_layers=args.arch_layers,
                       device=args.device)
        presets, extra = (args.architecture,), architecture_overrides(args.architecture, folder, prompts, args.device)
        num_cpus = max(2, min(8, os.cpu_count() or 2))
        mode = f"{args.architecture} ({'random weights' if not args.arch_layers else f'{args.arch_layers} blocks'}, " \
               f"{args.device})"
    runs = run_variants(methods, [*common_overrides(settings, args.seed), *extra, *args.overrides], workdir,
                        presets, num_cpus, rounds=args.rounds)
    rows = {}
    for label, per_round in runs.items():
        rows[label] = {**summarize_rounds([load_records(run["dir"]) for run in per_round],
                                          reward_k=settings["reward_k"]),
                       **per_round[0], "load": (per_round[0]["load"][0], per_round[-1]["load"][1]),
                       "wall_min": sum(run["wall_min"] for run in per_round)}
    text = report(rows, settings, args.seed, mode, cores=num_cpus if args.paper else None, rounds=args.rounds)
    publish(text, args.out or REPO_ROOT / "benchmarks" / "results" / f"compare_methods{'_paper' if args.paper else ''}.md")
    print(f"runs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
