"""Command-line tools, each `python -m learner.tools.<name>`; none of them imports Ray.

    pretrain   pre-train the shapes-world models (tiny policy, learned reward) and table the base policy
    eval       evaluate a run's checkpoint (or the base) on held-out prompts, optionally hybrid
    export     write a checkpoint's weights in the model family's native format
    diagnose   gradient signal-to-noise of the GRPO policy gradient per reward
    report     (re)write a run's report.md
    digest     statistics and weight hash of a short in-process run: is a change bitwise neutral?
"""

from __future__ import annotations

from pathlib import Path


def check_output_file(path: str | None, flag: str) -> None:
    """Before the work, not after it: a file the tool will write (`flag`, e.g. "--json") must not be a folder, and
    its folder must exist. Raises ValueError naming the flag."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {target / 'result.json'})")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: its folder {target.parent} does not exist")


def check_positive(**values: float | None) -> None:
    """Each given number (None: not given) must be > 0; raises ValueError naming the flag (`--batch_size` is
    written --batch-size)."""
    for name, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
