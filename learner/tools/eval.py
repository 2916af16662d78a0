"""Evaluate a trained checkpoint: held-out prompts, fixed seeds, full-step ODE (`learner.evaluation`).

    python -m learner.tools.eval --run runs/X                         # latest checkpoint, the run's config.json
    python -m learner.tools.eval --run runs/X --checkpoint runs/X/checkpoints/iter_000019 --json eval.json
    python -m learner.tools.eval --checkpoint DIR --config deploy/configs/tiny_cpu.yaml [dotted overrides]
    python -m learner.tools.eval --run runs/X --base                  # the starting model, for comparison
    python -m learner.tools.eval --run runs/X --hybrid-fraction 0.5   # trained for the first half of the steps
    python -m learner.tools.eval --run runs/X --seed 1234 --per-category 192  # = the run's own in-run evaluation
    python -m learner.tools.eval --run runs/X --split train --seed 501 --per-category 48  # fresh train-split prompts
    python -m learner.tools.eval --run runs/X --seed 101 --per-category 48 --breakdown  # which requirement fails

The same evaluation the run does, in-process (no Ray; rewards scored by `reward_servers.scorers`): the
tiny backend is scored by the shapes rule verifier (plus `run.eval_rewards`) on held-out prompts balanced
over the categories (`--per-category`, `--seed`); sd3 / flux by the configured rewards (or
`run.eval_rewards`) on every line of `--prompts-file`, by default on the run's own evaluation prompts (the first
`run.eval_prompts` lines of `run.eval_prompts_file`) at `run.eval_seed`, which is the in-run number. Fresh
`--seed`s give fresh held-out sets: the tiny run's in-run set is seed `run.eval_seed`.

`--breakdown` (tiny) adds what the verifier counted, per category: the fraction of required objects drawn in the
right colour, in the right shape and in exactly the right number, of relations that hold, and the extra and
detected objects per image, so a score's change can be read as which requirement moved; and the headroom, the
score the same images would get with some requirements' points granted (`evaluation.headroom`): where the points
are lost (benchmarks/results/alignment_experiments.md, "Why the gain stops near +0.05").

Hybrid inference (MixGRPO paper, Sec. "hybrid inference"): the trained model integrates the first
round(F·N) ODE steps, where the layout is decided, and the base model (the run's starting checkpoint)
the rest; F = 1 is the trained model, F = 0 the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from learner import evaluation
from learner.driver.build import policy_from_config
from learner.training import CheckpointError, latest_checkpoint, load_checkpoint
from services import shapes_world
from services.config import Config, ConfigError, load_config

from . import check_output_file, check_positive


def load_models(cfg: Config, checkpoint: Path | None, need_base: bool):
    """(trained policy, base policy or None). The trained one is the run's starting model with the checkpoint's
    trainable weights; the base is a LoRA policy with its adapter off, or a second load of the start."""
    trained = policy_from_config(cfg.model)
    if checkpoint is not None:
        weights, _, _ = load_checkpoint(checkpoint)
        trained.load_trainable_state_dict(weights)
    if not need_base:
        return trained, None
    return trained, (evaluation.AdapterOff(trained) if cfg.model.lora_rank > 0 else policy_from_config(cfg.model))


def eval_prompt_list(cfg: Config, prompts_file: str | None, per_category: int, seed: int,
                     split: str = "heldout") -> list[str]:
    """Balanced shapes prompts of `split` (tiny backend: "heldout", or "train" to see whether a gain is the trained
    prompts' only), else every line of `prompts_file`, or without one the run's own evaluation prompts (the first
    `run.eval_prompts` lines of `run.eval_prompts_file`)."""
    if split not in shapes_world.SPLITS:
        raise ConfigError(f"--split must be one of {list(shapes_world.SPLITS)}, got {split!r}")
    if cfg.model.backend == "tiny" and not prompts_file:
        return evaluation.shapes_prompts(split, per_category, seed)
    if split != "heldout":
        raise ConfigError(f"--split {split} chooses shapes-world prompts: the tiny backend without --prompts-file")
    if prompts_file:
        return evaluation.file_prompts(prompts_file, shapes_grammar=cfg.model.backend == "tiny")
    if not cfg.run.eval_prompts_file:
        raise ConfigError(f"--prompts-file (or run.eval_prompts_file) is required for backend {cfg.model.backend!r}")
    return evaluation.run_prompts(cfg)


def default_seed(cfg: Config, seed: int | None) -> int:
    """--seed, else: 0 for the tiny backend (a fresh held-out draw), `run.eval_seed` for a prompts file (the run's
    own initial noise: with the run's prompts, its in-run number)."""
    if seed is not None:
        return seed
    return 0 if cfg.model.backend == "tiny" else cfg.run.eval_seed


def evaluate_checkpoint(cfg: Config, checkpoint: Path | None, *, hybrid_fraction: float = 1.0,
                        num_steps: int | None = None, shift: float | None = None, seed: int = 0,
                        per_category: int = 16, prompts_file: str | None = None, batch_size: int = 64,
                        split: str = "heldout", breakdown: bool = False) -> dict:
    """The whole evaluation as a dict (JSON-able); `checkpoint` None evaluates the base model."""
    from reward_servers.scorers import build_scorer

    num_steps, shift = num_steps or cfg.sampler.num_steps, shift or cfg.sampler.shift
    if checkpoint is None:
        hybrid_fraction = 1.0  # the "trained" model is the base itself
    verifier = cfg.model.backend == "tiny"
    if breakdown and not verifier:  # before loading a real model
        raise ConfigError(f"--breakdown counts the shapes verifier's requirements: the tiny backend only, "
                          f"not {cfg.model.backend!r}")
    trained, base = load_models(cfg, checkpoint, need_base=hybrid_fraction < 1.0)
    prompts = eval_prompt_list(cfg, prompts_file, per_category, seed, split)
    if verifier:
        for p in prompts:
            shapes_world.parse(p)  # the verifier judges shapes-grammar prompts only: fail before sampling
    rewards = {s.name: build_scorer(s.name, s.model_path, **s.options).score for s in evaluation.reward_specs(cfg)}
    result = evaluation.evaluate(trained, prompts, num_steps=num_steps, shift=shift, seed=seed, verifier=verifier,
                                 rewards=rewards, base=base, fraction=hybrid_fraction, batch_size=batch_size,
                                 breakdown=breakdown)
    return {"checkpoint": None if checkpoint is None else str(checkpoint), "backend": cfg.model.backend,
            "hybrid_trained_steps": round(hybrid_fraction * num_steps), "split": split if verifier else None, **result}


def resolve(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config and checkpoint named by --run / --checkpoint / --config (None for --base)."""
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
    if not (ckpt / "state.json").is_file():  # before the models load: a wrong path fails at once
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a checkpoint folder (no state.json there; checkpoints are "
                                "<run>/checkpoints/iter_XXXXXX)")
    return cfg, ckpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner.tools.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory: its config.json and (unless --checkpoint) latest checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint folder (checkpoints/iter_XXXXXX)")
    p.add_argument("--config", action="append", default=[], help="preset or YAML file (repeatable)")
    p.add_argument("--base", action="store_true", help="evaluate the starting model (no checkpoint)")
    p.add_argument("--hybrid-fraction", type=float, default=1.0, metavar="F",
                   help="trained model for the first F of the steps, base model after (default 1)")
    p.add_argument("--num-steps", type=int, default=None, help="ODE steps (default: the config's sampler)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="prompt draw and initial noise (a fresh held-out set per "
                                                          "seed); default 0 for tiny, run.eval_seed for sd3 / flux")
    p.add_argument("--per-category", type=int, default=None, help="held-out prompts per category (tiny; default 16)")
    p.add_argument("--split", default="heldout", help="tiny: heldout (default) or train, the training split's "
                                                      "colour-shape pairs (a fresh draw per --seed)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, all of them (sd3 / flux default: the "
                                                        "first run.eval_prompts lines of run.eval_prompts_file)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it for bitwise repeats)")
    p.add_argument("--breakdown", action="store_true",
                   help="tiny: also the verifier's requirement rates per category (colour, shape, count, relation)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.path=/models/x")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_output_file(args.json, "--json")
        check_positive(num_steps=args.num_steps, shift=args.shift, batch_size=args.batch_size,
                       per_category=args.per_category)
        if not 0.0 <= args.hybrid_fraction <= 1.0:
            raise ValueError(f"--hybrid-fraction must be in [0, 1], got {args.hybrid_fraction}")
        if args.base and args.hybrid_fraction != 1.0:
            raise ValueError("--hybrid-fraction mixes a checkpoint with the base: not with --base")
        cfg, ckpt = resolve(args)
        if args.per_category is not None and (cfg.model.backend != "tiny" or args.prompts_file):
            raise ConfigError("--per-category draws shapes-world prompts: the tiny backend without --prompts-file "
                              "(a prompts file is scored whole)")
        result = evaluate_checkpoint(cfg, ckpt, hybrid_fraction=args.hybrid_fraction, num_steps=args.num_steps,
                                     shift=args.shift, seed=default_seed(cfg, args.seed), per_category=args.per_category or 16,
                                     prompts_file=args.prompts_file, batch_size=args.batch_size, split=args.split,
                                     breakdown=args.breakdown)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['checkpoint'] or 'base model'}: {result['num_steps']}-step ODE, shift {result['shift']}, "
          f"seed {result['seed']}, hybrid fraction {result['hybrid_fraction']}\n")
    label = "train split" if result.get("split") == "train" else "held-out"
    print(evaluation.markdown_table({label: result}))
    if "requirements" in result:
        print("\nwhat the verifier counted (fractions of required objects; extras and objects per image):\n")
        print(evaluation.requirements_table({label: result}))
    print("\noverall ± standard error: " + ", ".join(f"{c} {result['overall'][c]:.3f} ± {result['stderr'][c]:.3f}"
                                                    for c in result["columns"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
