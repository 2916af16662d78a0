"""Pre-train the shapes-world models, and evaluate the base policy.

    python -m learner.tools.pretrain policy --out /tmp/pt/A --threads 1   # 9,000 steps from scratch, ~55 min
    python -m learner.tools.pretrain policy --init rollout_workers/assets/tiny_policy --out /tmp/more --lr 1e-3
    python -m learner.tools.pretrain policy --init /tmp/pt/A --out /tmp/ref --refiner-channels 32   # grow a refiner
    python -m learner.tools.pretrain policy --out /tmp/p2 --patch-size 2 --threads 1   # another architecture
    # the shipped base: five stages, the commands in rollout_workers/assets/tiny_policy/README.md
    python -m learner.tools.pretrain policy --init rollout_workers/assets/tiny_policy --out /tmp/hb --sigma-band 0.7 1.0
    python -m learner.tools.pretrain reward --out reward_servers/assets/shapes_reward
    python -m learner.tools.pretrain eval --policy rollout_workers/assets/tiny_policy --json /tmp/eval.json

`policy`: flow matching (rectified flow) on freshly rendered TRAIN-split images of every category:
    x0 = render(prompt) in [-1, 1], ε ~ N(0, I), u ~ U(0, 1), σ = 3u / (1 + 2u)   (shift 3)
    x_σ = (1 − σ)·x0 + σ·ε,   loss = ‖v_θ(x_σ, σ, c) − (ε − x0)‖² (mean over pixels and batch)
AdamW, linear warmup then cosine decay to 0, grad-norm clip. Deterministic given (seed, thread count):
prompts and renders come from a numpy Generator, noise and σ from a torch Generator, both seeded.

Why shifted-uniform σ: it is the density of the σ's the shift-3 sampler visits (uniform u, shifted),
so training spends its samples where sampling spends its steps: P(σ > 0.8) = 0.43. A first run with
SD3's logit-normal(0, 1) (P(σ > 0.8) = 0.08) denoised well below σ = 0.6 but was poor at high noise,
where the layout is decided, and its 25-step samples were scattered 4x4-patch fragments (verifier
score ~0.33, no strict pass). Low noise is easy here (P(σ < 0.2) = 0.08 is plenty).

`reward`: dispatches to `reward_servers.scorers.shapes_reward_model.train_reward_model` (the learned reward
model), with policy samples labelled by the verifier.
`eval`: `learner.evaluation` on balanced held-out and train prompts (the verifier); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from learner.algo import shift_sigma
from learner.evaluation import evaluate, markdown_table, sample_images, shapes_prompts
from services import shapes_world

TRAIN_SHIFT = 3.0  # σ sampling for training; see the module docstring
EVAL_STEPS, EVAL_SHIFT = 25, 3.0  # `eval`: the paper's reference schedule, N = 25, shift 3
ARCHITECTURE_FLAGS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim",  # TinyConfig
                      "refiner_channels")

# ---------------------------------------------------------------------- flow-matching pieces (pure)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 images (B, H, W, 3) -> float32 x0 (B, 3, H, W) in [-1, 1] (the inverse of `policy.decode`)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_batch(prompts: list[str], rng: np.random.Generator) -> Tensor:
    """A fresh render of each prompt -> x0 (B, 3, 32, 32) in [-1, 1]."""
    return images_to_tensor(np.stack([shapes_world.render(p, rng) for p in prompts]))


def sample_sigma(batch: int, generator: torch.Generator, *, shift: float = TRAIN_SHIFT,
                 band: tuple[float, float] | None = None) -> Tensor:
    """σ = shift·u / (1 + (shift − 1)·u) with u ~ U(0, 1): the sampler's σ density -> (B,) float32.
    With `band` = (lo, hi), σ ~ U(lo, hi) instead: a continuation that trains one band of noise levels only."""
    u = torch.rand(batch, generator=generator)
    if band is None:
        return shift_sigma(u, shift).float()
    lo, hi = band
    return (lo + (hi - lo) * u).float()


def check_band(band: tuple[float, float] | None) -> None:
    """A σ band is (lo, hi) with 0 ≤ lo < hi ≤ 1 (None: no band); ValueError naming it otherwise."""
    if band is not None and not (len(band) == 2 and 0.0 <= band[0] < band[1] <= 1.0):
        raise ValueError(f"sigma band must be (lo, hi) with 0 <= lo < hi <= 1, got {band}")


def flow_matching_pair(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x0, noise (B, C, H, W), sigma (B,) -> (x_σ = (1 − σ)·x0 + σ·ε, target v = ε − x0), both (B, C, H, W)."""
    s = sigma.to(x0.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(policy, x0: Tensor, noise: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """Mean squared error between v_θ(x_σ, σ, c) and ε − x0; x0, noise (B, C, H, W), sigma (B,)."""
    x_sigma, target = flow_matching_pair(x0, noise, sigma)
    return torch.mean((policy.velocity(x_sigma, sigma, cond) - target) ** 2)


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR multiplier: linear 1/warmup … 1 over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_batch(policy, batch_size: int, rng: np.random.Generator, generator: torch.Generator,
               split: str = "train", p_uncond: float = 0.0, sigma_band: tuple[float, float] | None = None,
               ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """One training batch: (x0 (B, 3, 32, 32), noise (B, 3, 32, 32), sigma (B,), cond) of all categories.
    With `p_uncond` > 0 each prompt is replaced by the empty one with that probability (prompt dropout), so the
    model also learns the unconditional velocity that classifier-free guidance (`guidance_scale`) needs.
    `sigma_band`: σ ~ U(lo, hi) instead of the sampler's density (`sample_sigma`)."""
    prompts = shapes_world.sample_prompts(batch_size, rng, split=split)
    x0 = render_batch(prompts, rng)
    noise = torch.randn(x0.shape, generator=generator)
    if p_uncond > 0.0:
        prompts = ["" if drop else p for p, drop in zip(prompts, rng.random(batch_size) < p_uncond, strict=True)]
    return x0, noise, sample_sigma(batch_size, generator, band=sigma_band), policy.encode_prompts(prompts)


# ---------------------------------------------------------------------- the pre-training loop


def pretrain_policy(policy, *, steps: int, batch_size: int = 32, seed: int = 0, lr: float = 2e-3,
                    weight_decay: float = 0.01, warmup: int = 100, grad_clip: float = 1.0,
                    minutes: float | None = None, log_every: int = 50, p_uncond: float = 0.0,
                    sigma_band: tuple[float, float] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train `policy`'s trainable parameters by flow matching, in place.

    Every `log_every` steps logs the mean training loss since the last log and the loss on a fixed
    held-aside batch (same renders, noise and σ each time, so its curve is not sampling noise).
    `minutes` caps the wall time: the loop stops early (and says so) rather than overrun a budget.
    `p_uncond`: prompt dropout (`make_batch`); the fixed batch keeps its prompts.
    `sigma_band`: train σ ~ U(lo, hi) only (`sample_sigma`); the fixed batch keeps the sampler's σ density, so its
    loss stays comparable with other runs' (and shows what the band costs elsewhere).
    Returns {"steps", "train_loss", "fixed_loss", "seconds", "stopped_early", "history"}.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
    check_band(sigma_band)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    fixed = make_batch(policy, batch_size, np.random.default_rng(seed + 1),
                       torch.Generator().manual_seed(seed + 1))
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup=warmup, total=steps))
    policy.train(True)
    history, window, t0, stopped_early, step = [], [], time.perf_counter(), False, 0
    for step in range(1, steps + 1):
        x0, noise, sigma, cond = make_batch(policy, batch_size, rng, generator, p_uncond=p_uncond,
                                            sigma_band=sigma_band)
        loss = flow_matching_loss(policy, x0, noise, sigma, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        elapsed = time.perf_counter() - t0
        out_of_time = minutes is not None and elapsed > 60.0 * minutes
        if step % log_every == 0 or step == steps or out_of_time:
            with torch.no_grad():
                fixed_loss = float(flow_matching_loss(policy, *fixed))
            rate = step / elapsed
            history.append({"step": step, "train_loss": float(np.mean(window)), "fixed_loss": fixed_loss,
                            "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "seconds": elapsed})
            log(f"step {step:5d}/{steps}  loss {history[-1]['train_loss']:.4f}  fixed {fixed_loss:.4f}  "
                f"|g| {grad_norm:.2f}  lr {history[-1]['lr']:.2e}  {rate:.2f} it/s  "
                f"elapsed {elapsed / 60:.1f} min  ETA {(steps - step) / rate / 60:.1f} min")
            window = []
        if out_of_time:
            log(f"stopping early at step {step}: the {minutes} min budget is spent (LR schedule unfinished)")
            stopped_early = True
            break
    policy.train(False)
    return {"steps": step, "train_loss": history[-1]["train_loss"], "fixed_loss": history[-1]["fixed_loss"],
            "seconds": time.perf_counter() - t0, "stopped_early": stopped_early, "history": history}


# ---------------------------------------------------------------------- commands


def cmd_policy(args: argparse.Namespace) -> int:
    from rollout_workers.policies.tiny import TinyConfig, TinyPolicy

    sizes = {k: v for k, v in vars(args).items() if k in ARCHITECTURE_FLAGS and v is not None}
    band = tuple(args.sigma_band) if args.sigma_band else None
    try:
        check_band(band)
    except ValueError as e:
        raise SystemExit(f"error: --sigma-band: {e}") from None
    if args.init:  # continue from a saved policy: its architecture and weights, a fresh optimizer and schedule
        grow = sizes.pop("refiner_channels", 0)  # the one change --init allows: a refiner grown on the saved model
        if sizes:
            raise SystemExit(f"error: --init continues the saved architecture; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in sizes)}")
        policy = TinyPolicy.load(args.init)
        print(f"starting from {args.init}", flush=True)
        if grow:
            try:
                policy = policy.with_refiner(grow, seed=args.seed)
            except ValueError as e:
                raise SystemExit(f"error: --refiner-channels: {e}") from None
            print(f"grew a {grow}-channel pixel refiner (zero output at the start)", flush=True)
    else:
        try:
            config = TinyConfig.for_shapes_world(**sizes)
        except ValueError as e:
            raise SystemExit(f"error: bad architecture: {e}") from None
        policy = TinyPolicy.from_config(config, seed=args.seed)
        print(f"architecture: patch {config.patch_size}, {config.num_layers} layers, width "
              f"{config.num_attention_heads * config.attention_head_dim}, refiner {config.refiner_channels} "
              f"channels", flush=True)
    n = policy.num_parameters()
    print(f"tiny policy: {n['transformer']:,} transformer + {n['text_encoder']:,} text-encoder parameters "
          f"({n['trainable']:,} trainable); {args.steps} steps x {args.batch_size}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads", flush=True)
    result = pretrain_policy(policy, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                             warmup=args.warmup, minutes=args.minutes, log_every=args.log_every,
                             p_uncond=args.p_uncond, sigma_band=band,
                             log=lambda s: print(s, flush=True))
    policy.save(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "argv", "command")}
    record = {"command": " ".join(["python -m learner.tools.pretrain", *args.argv]), "parameters": n,
              **settings, **result}
    (Path(args.out) / "pretrain.json").write_text(json.dumps(record, indent=1))
    print(f"saved {args.out} after {result['steps']} steps in {result['seconds'] / 60:.1f} min; "
          f"final train loss {result['train_loss']:.4f}, fixed-batch loss {result['fixed_loss']:.4f}")
    return 0


def policy_samples(policy, n: int, *, split: str, seed: int, num_steps: int = 16, shift: float = 3.0,
                   batch_size: int = 64) -> dict:
    """n images from `policy` labelled by the verifier: half plain ODE samples, half mixed ODE-SDE samples
    with a random window (the distribution rollouts produce), so a reward model learns the images RL asks about.
    """
    from learner.algo import Window, sample_mixed, sigma_schedule
    from services import shapes_world as sw

    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    sigmas, images, prompts = sigma_schedule(num_steps, shift), [], []
    for lo in range(0, n, batch_size):
        ps = sw.sample_prompts(min(batch_size, n - lo), rng, split=split)
        noise = torch.randn(len(ps), *policy.latent_shape, generator=gen)
        if (lo // batch_size) % 2 == 0:  # the evaluation sampler: full-step ODE
            images.append(sample_images(policy, ps, num_steps=num_steps, shift=shift, noise=noise, batch_size=len(ps)))
        else:
            size = min(4, num_steps - 1)
            win = Window(int(rng.integers(0, num_steps - size)), size)  # start ≤ N−1−w
            x = sample_mixed(policy.velocity, noise, policy.encode_prompts(ps), sigmas, win, group_size=1, eta=0.7,
                             generator=gen).final
            images.append(policy.decode(x))
        prompts += ps
    images = np.concatenate(images)
    targets = np.array([sw.verify(p, im).score for p, im in zip(prompts, images)], dtype=np.float32)
    return {"images": images, "prompts": prompts, "targets": targets, "kinds": ["policy"] * len(prompts)}


def cmd_reward(args: argparse.Namespace) -> int:
    # lazy: the policy command does not need the reward model
    from reward_servers.scorers.shapes_reward_model import train_reward_model

    given = {"steps": args.steps, "batch_size": args.batch_size}
    extra = extra_eval = None
    if args.policy_samples:
        from rollout_workers.policies.tiny import TinyPolicy

        policy = TinyPolicy.load(args.policy)
        t0 = time.perf_counter()
        extra = policy_samples(policy, args.policy_samples, split="train", seed=args.seed)
        extra_eval = policy_samples(policy, max(256, args.policy_samples // 8), split="heldout", seed=args.seed + 1)
        print(f"labelled {len(extra['prompts'])} + {len(extra_eval['prompts'])} policy samples from {args.policy} "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
    metrics = train_reward_model(args.out, seed=args.seed, num_threads=torch.get_num_threads(), extra=extra,
                                 extra_eval=extra_eval, **{k: v for k, v in given.items() if v is not None})
    print(json.dumps({k: v for k, v in metrics.items() if k in ("train", "heldout", "extra_eval", "loss", "seconds")},
                     indent=1, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rollout_workers.policies.tiny import TinyPolicy

    policy = TinyPolicy.load(args.policy)
    results = {}
    for split in args.splits.split(","):
        t0 = time.perf_counter()
        prompts = shapes_prompts(split, args.prompts_per_category, args.seed)
        results[split] = evaluate(policy, prompts, num_steps=args.num_steps, shift=args.shift, seed=args.seed,
                                  verifier=True, batch_size=args.batch_size)
        print(f"{split}: {len(prompts)} prompts in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\n{args.num_steps}-step ODE, shift {args.shift}, seed {args.seed}, "
          f"{args.prompts_per_category} prompts per category\n")
    print(markdown_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a contended box)")
    p = argparse.ArgumentParser(prog="python -m learner.tools.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pol = sub.add_parser("policy", parents=[common], help="flow-matching pre-training of the tiny policy")
    pol.add_argument("--out", required=True, help="a new (or empty) folder for the model")
    pol.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    pol.add_argument("--steps", type=int, default=9000)
    pol.add_argument("--batch-size", type=int, default=32)
    pol.add_argument("--seed", type=int, default=0)
    pol.add_argument("--init", default=None,
                     help="a saved policy folder to continue from (fresh optimizer and LR schedule); default: random")
    pol.add_argument("--lr", type=float, default=2e-3)
    pol.add_argument("--warmup", type=int, default=200)
    pol.add_argument("--minutes", type=float, default=None, help="wall-time cap; stops early when spent")
    pol.add_argument("--log-every", type=int, default=50)
    pol.add_argument("--p-uncond", type=float, default=0.0,
                     help="prompt dropout: the empty prompt with this probability, for classifier-free guidance "
                          "(model.guidance_scale > 1); 0.1 in the README's guidance measurement")
    pol.add_argument("--sigma-band", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                     help="train σ ~ U(LO, HI) only, not the sampler's density (a continuation aimed at one band of "
                          "noise levels; README: 0.7 1.0, where a shape is decided)")
    arch = pol.add_argument_group("architecture of a fresh model (default: the shipped one's, TinyConfig)")
    for flag in ARCHITECTURE_FLAGS:
        arch.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    pol.set_defaults(func=cmd_policy)
    rew = sub.add_parser("reward", parents=[common], help="train the learned shapes reward model")
    rew.add_argument("--out", required=True, help="a new (or empty) folder for the reward model")
    rew.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds (the shipped model)")
    rew.add_argument("--steps", type=int, default=None, help="default: train_reward_model's")
    rew.add_argument("--batch-size", type=int, default=None, help="default: train_reward_model's")
    rew.add_argument("--seed", type=int, default=0)
    rew.add_argument("--policy", default=str(Path(__file__).resolve().parents[2] / "rollout_workers/assets/tiny_policy"),
                     help="policy whose samples (labelled by the verifier) join the training data")
    rew.add_argument("--policy-samples", type=int, default=4096, help="0: rendered/corrupted images only")
    rew.set_defaults(func=cmd_reward)
    ev = sub.add_parser("eval", parents=[common], help="verifier scores of a policy's ODE samples")
    ev.add_argument("--policy", required=True)
    ev.add_argument("--num-steps", type=int, default=EVAL_STEPS)
    ev.add_argument("--shift", type=float, default=EVAL_SHIFT)
    ev.add_argument("--prompts-per-category", type=int, default=32)
    ev.add_argument("--splits", default="heldout,train")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--json", default=None)
    ev.set_defaults(func=cmd_eval)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad flags, before minutes of training: a ValueError naming the flag. A non-empty --out is refused without
    --overwrite (it may hold a model: the shipped one, or an earlier stage's)."""
    from services import shapes_world

    from . import check_output_file, check_positive

    check_positive(**{k: getattr(args, k, None) for k in ("steps", "batch_size", "minutes", "log_every", "threads",
                                                          "num_steps", "shift", "prompts_per_category")})
    if getattr(args, "lr", 0.0) < 0 or getattr(args, "warmup", 0) < 0 or not 0.0 <= getattr(args, "p_uncond", 0.0) < 1.0:
        raise ValueError("--lr and --warmup must be >= 0 (lr 0: a continuation that keeps the weights), --p-uncond "
                         "in [0, 1)")
    for flag in ("init", "policy"):
        folder = getattr(args, flag, None)
        if folder and not (Path(folder) / "config.json").is_file() and (flag == "init" or args.command == "eval"
                                                                        or args.policy_samples > 0):
            raise ValueError(f"--{flag} {folder}: not a saved tiny policy (no config.json there)")
    if args.command == "eval":
        if bad := [x for x in args.splits.split(",") if x not in shapes_world.SPLITS]:
            raise ValueError(f"--splits {args.splits}: {bad} not in {list(shapes_world.SPLITS)}")
        check_output_file(args.json, "--json")
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty (a saved model?); pass --overwrite to replace what it holds, or "
                         f"give a new folder")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
