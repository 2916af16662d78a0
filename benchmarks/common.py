"""What every benchmark script does with its result table."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: Path | None) -> None:
    """Print the result (Markdown) and, with `out`, write it there too (parents created)."""
    print("\n" + text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")
