"""Screened levers for issue 17, kept so their numbers can be reproduced: AWM's matching objective changed three ways.

    python benchmarks/experiments/matching_screen.py --variant positive -- --methods awm --seeds 1 --iterations 30 \
        --eval-every 10 --sets 2 --per-category 48 --threads 1 learner.num_threads=1 rollout.num_threads=1 \
        sampler.group_noise=independent grpo.kl_beta=0 grpo.awm_lagged_beta=0 learner.lr=1e-4

- `positive`: AWM with only its positive advantages, max(A, 0): a RAFT-like pull toward each group's better members,
  never a push from the worse.
- `shuffled`: the same positive pull with the advantages shuffled among the rows of each loss call (seeded): the
  same weights, no reward in them. The control for `positive`.
- `dpo`: an online Diffusion-DPO-style loss in place of AWM's. r = −(L_θ − L_ref) is a row's implicit reward (its
  flow-matching error against the starting model's at the same x_t, averaged over its time draws); within each
  group every pair with A_i > A_j adds −(A_i − A_j)·log σ(β·(r_i − r_j)), normalised by Σ (A_i − A_j). It
  saturates once the model prefers the better member enough, so it cannot drift far from the reference. It needs
  the reference velocity: pass `grpo.kl_beta` > 0 (a tiny value keeps the reference without a KL term to speak of).

Everything after `--` goes to `benchmarks/sample_efficiency.py`. It is an experiment, not a config field: it patches
`learner.training.objectives.awm_loss` (positive, shuffled) or `learner.training.updates.matching_micro_loss` (dpo) in
this process only. Measured on seed 1 (results/alignment_experiments.md, "The headroom"), none of the three beat the default, so none was built
into the learner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from learner.algo.family import flow_matching_error  # noqa: E402
from learner.training import objectives, updates  # noqa: E402

VARIANTS = ("positive", "shuffled", "dpo")


def pairwise_preference_loss(r: torch.Tensor, adv: torch.Tensor, groups: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ_{i,j same group, A_i > A_j} −(A_i − A_j)·log σ(β·(r_i − r_j)) / Σ (A_i − A_j); 0 when no pair differs."""
    w = (adv[:, None] - adv[None, :]).clamp(min=0) * (groups[:, None] == groups[None, :])
    return -(w * F.logsigmoid(beta * (r[:, None] - r[None, :]))).sum() / w.sum().clamp(min=1e-8)


def install(variant: str, beta: float = 100.0, seed: int = 12345) -> dict:
    """Patch this process's learner; -> {"restore": undo the patch}."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    plain_awm, plain_micro = objectives.awm_loss, updates.matching_micro_loss

    def restore() -> None:
        objectives.awm_loss, updates.matching_micro_loss = plain_awm, plain_micro

    if variant in ("positive", "shuffled"):
        gen = torch.Generator().manual_seed(seed)

        def awm_loss(err, t, adv, *, weighting="ghuber", clip=5.0):
            if variant == "shuffled":
                adv = adv[torch.randperm(len(adv), generator=gen).to(adv.device)]
            return plain_awm(err, t, adv.clamp(min=0), weighting=weighting, clip=clip)

        objectives.awm_loss = awm_loss
        return {"restore": restore}

    def dpo_micro_loss(policy, batch, cond, rows, slots, adv, *, spec, seed, key, kl_beta=0.0, lagged=None):
        x0, eps, t, x_t, c = objectives.matching_inputs(batch, cond, rows, slots, spec=spec, seed=seed, key=key)
        mb, k, device = len(rows), len(slots), x0.device
        v = policy.velocity(x_t, t, c).float()
        with torch.no_grad():
            v_ref = policy.reference_velocity(x_t, t, c).float()
        err = flow_matching_error(v, x0, eps).view(mb, k)
        r = -(err.mean(dim=1) - flow_matching_error(v_ref, x0, eps).view(mb, k).mean(dim=1))
        loss = pairwise_preference_loss(r, adv[rows].to(device).float(), rows.to(device) // batch.group_size, beta)
        one = torch.ones(())
        return loss, {"ratio_mean": one, "ratio_min": one, "ratio_max": one, "clip_frac": torch.zeros(()),
                      "approx_kl": torch.zeros(()), "loss_per_step": err.detach().mean(dim=0).cpu(),
                      "forward_rows": mb * k, "kl": r.detach().abs().mean()}

    updates.matching_micro_loss = dpo_micro_loss
    return {"restore": restore}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--dpo-beta", type=float, default=100.0, help="dpo: β of the implicit-reward difference")
    args = p.parse_args(ours)
    install(args.variant, args.dpo_beta)
    from benchmarks.sample_efficiency import main as sample_efficiency

    return sample_efficiency(rest)


if __name__ == "__main__":
    raise SystemExit(main())
