"""Evaluate a trained checkpoint: held-out prompts, fixed seeds, full-step ODE, every configured reward.

    python -m learner.eval --run runs/X                            # latest checkpoint, the run's config.json
    python -m learner.eval --run runs/X --checkpoint runs/X/checkpoints/iter_000019 --json eval.json
    python -m learner.eval --checkpoint DIR --config deploy/configs/tiny_cpu.yaml [dotted overrides]
    python -m learner.eval --run runs/X --base                     # the starting model, for comparison
    python -m learner.eval --run runs/X --hybrid-fraction 0.5      # trained for the first half of the steps

Rewards are scored in-process (`reward_servers.scorers.build_scorer`), no Ray needed. The tiny backend
also gets the shapes rule verifier (score and strict accuracy) and a per-category table on held-out
prompts balanced over the categories; other backends need `--prompts-file`.

Hybrid inference (MixGRPO paper, Sec. "hybrid inference"): the trained model integrates the first
round(F·N) ODE steps, where the layout is decided, and the base model (the run's starting checkpoint)
the rest; F = 1 is the trained model, F = 0 the base. Both segments start from the same seeded noise, so
F = 1 reproduces `learner.evaluate_base.sample_images` of the trained model exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from learner.algo import sample_ode, sigma_schedule
from services import shapes_world
from services.config import Config, ConfigError, load_config


@torch.no_grad()
def sample_hybrid(trained, base, prompts: Sequence[str], *, num_steps: int, shift: float, seed: int,
                  fraction: float = 1.0, batch_size: int = 64) -> np.ndarray:
    """Euler ODE with `trained` for the first round(fraction·N) steps and `base` after → uint8 (P, H, W, 3).

    The initial noise (P, C, H, W) is drawn at once from a generator seeded with `seed` (as in
    `evaluate_base.sample_images`), so an image does not depend on `batch_size`.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hybrid fraction must be in [0, 1], got {fraction}")
    sigmas = sigma_schedule(num_steps, shift)  # (N+1,)
    k = round(fraction * num_steps)
    noise = torch.randn((len(prompts), *trained.latent_shape), generator=torch.Generator().manual_seed(seed))
    images = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        x = noise[lo:lo + batch_size].to(trained.device)  # (b, C, H, W)
        if k > 0:
            x = sample_ode(trained.velocity, x, trained.encode_prompts(chunk), sigmas[:k + 1])
        if k < num_steps:
            x = sample_ode(base.velocity, x, base.encode_prompts(chunk), sigmas[k:])
        images.append(trained.decode(x))
    return np.concatenate(images, axis=0)


class AdapterOff:
    """The base model of a LoRA policy without a second copy: its velocity with the adapter disabled."""

    def __init__(self, policy) -> None:
        self.policy, self.latent_shape, self.device = policy, policy.latent_shape, policy.device

    def encode_prompts(self, prompts: Sequence[str]):
        return self.policy.encode_prompts(prompts)

    def velocity(self, x, sigma, cond):
        self.policy.transformer.disable_adapters()
        try:
            return self.policy.velocity(x, sigma, cond)
        finally:
            self.policy.transformer.enable_adapters()

    def decode(self, x) -> np.ndarray:
        return self.policy.decode(x)


def load_models(cfg: Config, checkpoint: Path | None, need_base: bool):
    """(trained policy, base policy or None). The trained one is the run's starting model with the checkpoint's
    trainable weights; the base is a LoRA policy with its adapter off, or a second load of the start."""
    from learner.actors import policy_from_config
    from learner.checkpoint import load_checkpoint

    trained = policy_from_config(cfg.model)
    if checkpoint is not None:
        weights, _, _ = load_checkpoint(checkpoint)
        trained.load_trainable_state_dict(weights)
    if not need_base:
        return trained, None
    return trained, (AdapterOff(trained) if cfg.model.lora_rank > 0 else policy_from_config(cfg.model))


def eval_prompt_list(cfg: Config, prompts_file: str | None, per_category: int, seed: int) -> list[str]:
    """Balanced held-out shapes prompts (tiny backend), else the lines of `prompts_file`."""
    if prompts_file:
        from services.prompts import read_prompts_file

        return read_prompts_file(prompts_file, shapes_grammar=cfg.model.backend == "tiny")
    if cfg.model.backend != "tiny":
        raise ConfigError(f"--prompts-file is required for backend {cfg.model.backend!r} (held-out prompts "
                          "exist only for the shapes world)")
    from learner.evaluate_base import eval_prompts

    return eval_prompts("heldout", per_category, seed)


def score_all(cfg: Config, prompts: list[str], images: np.ndarray, batch_size: int = 64) -> dict:
    """Every configured reward (and the verifier for the tiny backend): overall and per-category means."""
    from reward_servers.scorers import build_scorer

    tiny = cfg.model.backend == "tiny"
    cats = [shapes_world.category(p) for p in prompts] if tiny else ["all"] * len(prompts)
    columns: dict[str, np.ndarray] = {}
    for spec in cfg.reward.rewards:
        scorer = build_scorer(spec.name, spec.model_path, **spec.options)
        columns[spec.name] = np.concatenate([scorer.score(images[lo:lo + batch_size], prompts[lo:lo + batch_size])
                                             for lo in range(0, len(prompts), batch_size)])
    if tiny:
        verdicts = [shapes_world.verify(p, im) for p, im in zip(prompts, images)]
        columns["verifier_score"] = np.array([v.score for v in verdicts], np.float32)
        columns["verifier_strict"] = np.array([float(v.strict) for v in verdicts], np.float32)
    per_category = {}
    for cat in dict.fromkeys(cats):
        idx = [i for i, c in enumerate(cats) if c == cat]
        per_category[cat] = {"n": len(idx), **{name: float(col[idx].mean()) for name, col in columns.items()}}
    # overall = macro-average over categories (like evaluate_base), so unbalanced prompt lists do not tilt it
    overall = {name: float(np.mean([m[name] for m in per_category.values()])) for name in columns}
    return {"overall": {"n": len(prompts), **overall}, "per_category": per_category}


def markdown(result: dict) -> str:
    names = [k for k in result["overall"] if k != "n"]
    lines = ["| category | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows = [*result["per_category"].items(), ("**overall**", result["overall"])]
    for cat, m in rows:
        lines.append(f"| {cat} | {m['n']} | " + " | ".join(f"{m[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(cfg: Config, checkpoint: Path | None, *, hybrid_fraction: float = 1.0,
                        num_steps: int | None = None, shift: float | None = None, seed: int = 0,
                        per_category: int = 16, prompts_file: str | None = None, batch_size: int = 64) -> dict:
    """The whole evaluation as a dict (JSON-able); `checkpoint` None evaluates the base model."""
    num_steps, shift = num_steps or cfg.sampler.num_steps, shift or cfg.sampler.shift
    if checkpoint is None:
        hybrid_fraction = 1.0  # the "trained" model is the base itself
    trained, base = load_models(cfg, checkpoint, need_base=hybrid_fraction < 1.0)
    prompts = eval_prompt_list(cfg, prompts_file, per_category, seed)
    images = sample_hybrid(trained, base, prompts, num_steps=num_steps, shift=shift, seed=seed,
                           fraction=hybrid_fraction, batch_size=batch_size)
    return {"checkpoint": None if checkpoint is None else str(checkpoint), "backend": cfg.model.backend,
            "num_steps": num_steps, "shift": shift, "seed": seed, "hybrid_fraction": hybrid_fraction,
            "hybrid_trained_steps": round(hybrid_fraction * num_steps), **score_all(cfg, prompts, images, batch_size)}


def resolve(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config and checkpoint named by --run / --checkpoint / --config (None for --base)."""
    from learner.checkpoint import latest_checkpoint

    if args.run:
        run = Path(args.run)
        if not (run / "config.json").is_file():
            raise ConfigError(f"--run {run}: no config.json there (is it a run directory?)")
        cfg = load_config([run / "config.json", *args.config], args.overrides)
    elif args.checkpoint or args.base:
        cfg = load_config(args.config, args.overrides)
    else:
        raise ConfigError("give --run DIR, or --checkpoint DIR (with --config), or --base with --config")
    if args.base:
        return cfg, None
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(Path(args.run) / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"--run {args.run}: no checkpoint in {Path(args.run) / 'checkpoints'}")
    return cfg, ckpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory: its config.json and (unless --checkpoint) latest checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint folder (checkpoints/iter_XXXXXX)")
    p.add_argument("--config", action="append", default=[], help="preset or YAML file (repeatable)")
    p.add_argument("--base", action="store_true", help="evaluate the starting model (no checkpoint)")
    p.add_argument("--hybrid-fraction", type=float, default=1.0, metavar="F",
                   help="trained model for the first F of the steps, base model after (default 1)")
    p.add_argument("--num-steps", type=int, default=None, help="ODE steps (default: the config's sampler)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt draw and initial noise")
    p.add_argument("--per-category", type=int, default=16, help="held-out prompts per category (tiny)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (required for sd3 / flux)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it for bitwise repeats)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.path=/models/x")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg, ckpt = resolve(args)
        result = evaluate_checkpoint(cfg, ckpt, hybrid_fraction=args.hybrid_fraction, num_steps=args.num_steps,
                                     shift=args.shift, seed=args.seed, per_category=args.per_category,
                                     prompts_file=args.prompts_file, batch_size=args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['checkpoint'] or 'base model'}: {result['num_steps']}-step ODE, shift {result['shift']}, "
          f"seed {result['seed']}, hybrid fraction {result['hybrid_fraction']}\n")
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
