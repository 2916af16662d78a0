"""What benchmark scripts share: publishing the result table, and waiting for a GPU before reading a clock."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: Path | None) -> None:
    """Print the result (Markdown) and, with `out`, write it there too (parents created)."""
    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")


def synchronize(device) -> None:
    """Wait for the GPU's queued work when `device` (a torch.device or its name) is CUDA, so a clock read after it
    includes that work; nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
