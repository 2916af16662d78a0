"""Prompt sources: the shapes world's train split, or a text file with one prompt per line.

Prompts for an iteration are a pure function of (run seed, iteration), so a resumed run sees the
same prompts as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from learner.algo.seeding import Stream, mix_seed

from . import shapes_world

MAX_PROMPT_CHARS = 2000


def read_prompts_file(path: str | Path, *, shapes_grammar: bool = False) -> list[str]:
    """Non-empty lines of a UTF-8 file. Every bad line is reported with its number in one error."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"prompts file {path} is a folder; give a text file, one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    prompts, problems = [], []
    for no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(text) > MAX_PROMPT_CHARS:
            problems.append(f"line {no}: longer than {MAX_PROMPT_CHARS} characters")
        elif any(ord(ch) < 32 for ch in text):
            problems.append(f"line {no}: contains control characters")
        elif shapes_grammar:
            try:
                shapes_world.parse(text)
            except ValueError as e:
                problems.append(f"line {no}: {e}")
        prompts.append(text)
    if problems:
        raise ValueError(f"{path}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems[:20]))
    if not prompts:
        raise ValueError(f"{path}: no prompts (only blank or comment lines)")
    return prompts


class PromptSource:
    """`source="shapes"` samples the train split; `"file"` draws uniformly from the file's lines."""

    def __init__(self, source: str, seed: int, prompts_file: str | None = None, *, shapes_grammar: bool = False):
        self.source, self.seed = source, seed
        if source == "file":
            if prompts_file is None:
                raise ValueError("a prompts file is required for source='file'")
            self.pool = read_prompts_file(prompts_file, shapes_grammar=shapes_grammar)
        elif source != "shapes":
            raise ValueError(f"unknown prompt source {source!r}; expected 'shapes' or 'file'")

    def for_iteration(self, iteration: int, n: int) -> list[str]:
        rng = np.random.default_rng(mix_seed(self.seed, Stream.PROMPTS, iteration))
        if self.source == "shapes":
            return shapes_world.sample_prompts(n, rng, split="train")
        return [self.pool[i] for i in rng.integers(0, len(self.pool), size=n)]
