"""The learner's step under classifier-free guidance: one 2B batch with the negative half detached (what Flow-GRPO's
SD3 trainer runs, scripts/train_sd3.py compute_log_prob) against the negative branch without a graph and B rows with
one (`rollout_workers.policies.base.sd3_transformer_velocity`), side by side in one invocation.

    python benchmarks/cfg_backward.py                                   # SD3.5-M blocks, 2 of 24, 128 px, CPU
    python benchmarks/cfg_backward.py --device cuda --layers 24 --size 512 --rows 3   # the real per-GPU shape

Both compute the same velocity and the same gradient (checked here, and in tests/integration/
test_policies_diffusers.py::test_sd3_classifier_free_guidance); the table gives each one's median seconds per
forward + backward of `--rows` samples, the ratio, and the gradients' largest relative difference. Random weights of
the real SD3.5-Medium block (`benchmarks/real_arch.py`) cost what trained ones do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import publish, synchronize  # noqa: E402 (needs the path above)
from benchmarks.real_arch import sd3_5_medium_transformer  # noqa: E402
from rollout_workers.policies.base import sd3_transformer_velocity  # noqa: E402

SCALE = 4.5  # SD3.5-Medium's guidance in the presets


def one_batch_detached(transformer, x, sigma, cond, device, bf16):
    """The reference's way: [negative; positive] in one batch of 2B under autograd, the negative half detached."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        v = transformer(hidden_states=x.repeat(2, 1, 1, 1),
                        encoder_hidden_states=torch.cat([cond["negative_encoder_hidden_states"],
                                                         cond["encoder_hidden_states"]]),
                        pooled_projections=torch.cat([cond["negative_pooled_projections"],
                                                      cond["pooled_projections"]]),
                        timestep=(1000.0 * sigma).repeat(2), return_dict=False)[0].float()
    v_neg, v_pos = v.chunk(2)
    v_neg = v_neg.detach()
    return v_neg + SCALE * (v_pos - v_neg)


def split(transformer, x, sigma, cond, device, bf16):
    return sd3_transformer_velocity(transformer, x, sigma, cond, device=device, guidance_scale=SCALE,
                                    autocast_bf16=bf16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="SD3.5-Medium blocks (the real model: 24)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent side = size / 8)")
    p.add_argument("--rows", type=int, default=3, help="samples per micro-batch (the presets: 3 for FLUX, 9 for SD3.5)")
    p.add_argument("--text", type=int, default=77, help="text tokens (SD3: 77 CLIP + the T5 length)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing, as the presets train")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    transformer = sd3_5_medium_transformer(args.layers).to(device)
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    side = args.size // 8
    x = torch.randn(args.rows, 16, side, side, device=device)
    sigma = torch.rand(args.rows, device=device)
    cond = {"encoder_hidden_states": torch.randn(args.rows, args.text, 4096, device=device),
            "pooled_projections": torch.randn(args.rows, 2048, device=device),
            "negative_encoder_hidden_states": torch.randn(args.rows, args.text, 4096, device=device),
            "negative_pooled_projections": torch.randn(args.rows, 2048, device=device)}
    target = torch.randn_like(x)
    params = [q for q in transformer.parameters() if q.requires_grad]

    def step(fn) -> tuple[float, list[torch.Tensor]]:
        for q in params:
            q.grad = None
        synchronize(device)
        t0 = time.perf_counter()
        ((fn(transformer, x, sigma, cond, device, bf16) - target) ** 2).mean().backward()
        synchronize(device)
        return time.perf_counter() - t0, [q.grad.detach().clone() for q in params]

    times = {"one 2B batch, negative detached (reference)": [], "negative without a graph, B rows (ours)": []}
    fns = dict(zip(times, (one_batch_detached, split), strict=True))
    grads = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped; the two alternate
        for name, fn in fns.items():
            seconds, grads[name] = step(fn)
            times[name].append(seconds)
    ref, ours = (grads[n] for n in times)
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(ref, ours, strict=True))
    med = {n: statistics.median(t[1:]) for n, t in times.items()}
    base = med["one 2B batch, negative detached (reference)"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    lines = [f"SD3.5-Medium blocks: {args.layers}, {args.size} px ({side * side // 4} image tokens + {args.text} text), "
             f"{args.rows} samples, CFG {SCALE}, {'bf16 autocast' if bf16 else 'fp32'}, checkpointing "
             f"{'on' if args.checkpointing else 'off'}, on {where}; median of {args.repeats} after one warm-up; "
             f"gradients' largest relative difference {diff:.1e}", "",
             "| learner forward + backward | s (median) | × reference |", "|---|---:|---:|"]
    lines += [f"| {n} | {s:.3f} | {s / base:.2f} |" for n, s in med.items()]
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
