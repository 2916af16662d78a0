"""Export a run's trained weights in the format its model family loads natively.

    python -m learner.tools.export --run runs/X --out exported/X                  # latest checkpoint
    python -m learner.tools.export --run runs/X --checkpoint runs/X/checkpoints/iter_000019 --out exported/X19

- tiny: the full tiny checkpoint (config.json + model.safetensors) that `TinyPolicy.load(OUT)` reads, with
  the trained weights merged (a LoRA adapter is fused into the transformer; the result has no adapter).
- SD3 / FLUX with LoRA: diffusers LoRA weights (OUT/pytorch_lora_weights.safetensors) written by
  `StableDiffusion3Pipeline.save_lora_weights` / `FluxPipeline.save_lora_weights` with the adapter's
  peft config as metadata (so rank and alpha survive), for `pipeline.load_lora_weights(OUT)` on the base
  pipeline (the run's `model.path`).
- SD3 / FLUX trained fully (lora_rank 0): the whole pipeline folder (`save_pretrained`).
Every export also holds export.json: where the weights came from, and the guidance scale the run sampled with
(`guidance_scale`: pass it to the pipeline, or to `TinyPolicy.load(OUT, guidance_scale=…)`; 1 = none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from learner.driver.build import policy_from_config
from learner.training import CheckpointError, latest_checkpoint, load_checkpoint
from services.config import Config, ConfigError, load_config

EXPORT_INFO = "export.json"


def load_trained(cfg: Config, checkpoint: Path):
    """The run's starting model with the checkpoint's trainable weights, and the checkpoint's meta."""
    weights, _, meta = load_checkpoint(checkpoint)
    policy = policy_from_config(cfg.model)
    policy.load_trainable_state_dict(weights)
    return policy, meta


def export_tiny(policy, out: Path) -> str:
    """Write a self-contained tiny checkpoint; a LoRA adapter is fused into the transformer first."""
    from rollout_workers.policies.tiny import TinyPolicy

    if policy.trainable.lora_rank == 0:
        policy.save(out)
        return "tiny"
    policy.transformer.fuse_lora()  # W ← W + (α/r)·B·A, then drop the adapter modules
    policy.transformer.unload_lora()
    TinyPolicy(policy.config, policy.transformer, policy.text_encoder).save(out)
    return "tiny (LoRA fused)"


def export_diffusers(policy, out: Path) -> str:
    """LoRA → diffusers LoRA weights for `load_lora_weights`; full fine-tune → the whole pipeline folder."""
    if policy.trainable.lora_rank == 0:
        policy.pipe.save_pretrained(out)
        return "diffusers pipeline"
    from peft import get_peft_model_state_dict

    transformer = policy.transformer
    layers = get_peft_model_state_dict(transformer)  # peft names, e.g. transformer_blocks.0.attn.to_q.lora_A.weight
    type(policy.pipe).save_lora_weights(
        out, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    return "diffusers LoRA"


def export_run(cfg: Config, checkpoint: Path, out: Path) -> Path:
    """Export `checkpoint` of a run configured by `cfg` into `out`; returns `out`."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a new (or empty) folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")
    policy, meta = load_trained(cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    kind = export_tiny(policy, out) if cfg.model.backend == "tiny" else export_diffusers(policy, out)
    info = {"format": kind, "backend": cfg.model.backend, "base_model": cfg.model.path or "shipped tiny checkpoint",
            "checkpoint": str(checkpoint.resolve()), "iteration": meta.get("iteration"), "weight_version": meta.get("version"),
            "run_id": meta.get("run_id"), "lora_rank": cfg.model.lora_rank,
            # the adapter's own alpha: model.lora_alpha 0 means alpha = rank (scale 1)
            "lora_alpha": (cfg.model.lora_alpha or float(cfg.model.lora_rank)) if cfg.model.lora_rank else 0.0,
            "guidance_scale": cfg.model.guidance_scale}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    readable_as_umask(out)
    return out


def readable_as_umask(folder: Path) -> None:
    """Give the files under `folder` the mode a plain `open` would (0666 less the umask): safetensors writes its
    files 0600, so an export meant for others (a shared model store) was readable by its writer only."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner.tools.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (config.json, checkpoints/)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--out", required=True, help="a new (or empty) output folder")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.path=/models/sd3.5-medium")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    try:
        if not (run / "config.json").is_file():
            raise ConfigError(f"--run {run}: no config.json there (is it a run directory?)")
        cfg = load_config([run / "config.json"], args.overrides)
        ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--run {run}: no checkpoint in {run / 'checkpoints'}")
        out = export_run(cfg, ckpt, Path(args.out))
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} → {out} ({json.loads((out / EXPORT_INFO).read_text())['format']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
