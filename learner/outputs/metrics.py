"""Run outputs the driver writes: metrics.jsonl and human-readable progress lines (job logs)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class MetricsLog:
    """Append-only JSON lines; one record per iteration (`kind: train`) and per evaluation (`kind: eval`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        rec = {"time": time.time(), **{k: _clean(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        """Every record. A last line that does not parse is a write the process did not finish (it was killed):
        left out, with a warning; a line that does not parse before the last is damage, refused naming it."""
        if not self.path.exists():
            return []
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]
        out = []
        for k, (n, line) in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if k + 1 < len(lines):
                    raise ValueError(f"{self.path}: line {n} is not a JSON record ({e.msg}); the file is damaged "
                                     f"before its last line") from None
                print(f"{self.path}: its last line (line {n}) is a record cut short, left out", file=sys.stderr)
        return out

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records of iterations after the checkpoint (they will be re-run), and a last record a
        killed process did not finish."""
        keep = [r for r in self.records() if r.get("iteration", -1) <= iteration]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


class Progress:
    """One line per iteration: iteration, window, reward, time per iteration, ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.times = total, []

    def report(self, rec: dict) -> None:
        self.times.append(rec["iteration_seconds"])
        recent = self.times[-10:]
        per_iter = sum(recent) / len(recent)
        left = self.total - rec["iteration"] - 1
        rewards = " ".join(f"{k.removeprefix('reward_mean/')}={v:.3f}" for k, v in rec.items()
                           if k.startswith("reward_mean/"))
        print(f"[iter {rec['iteration'] + 1:>4}/{self.total}] window=[{rec['window_start']},"
              f"{rec['window_start'] + rec['window_size']}) reward={rec['reward_mean']:.3f} {rewards} "
              f"{ratio_text(rec)}gnorm={rec['grad_norm']:.3f} {rec['iteration_seconds']:.1f}s/it ETA {left * per_iter / 60:.1f} min",
              flush=True)

    @staticmethod
    def report_eval(rec: dict) -> None:
        print(f"[eval {eval_when(rec)}] held-out, {rec.get('eval_num_prompts', '?')} prompts: {eval_summary(rec)}",
              flush=True)


def eval_columns(rec: dict) -> list[str]:
    """The overall columns of an eval record (`eval_columns`; older records: the verifier's)."""
    return list(rec.get("eval_columns") or [k for k in ("verifier_score", "verifier_strict") if f"eval_{k}" in rec])


def eval_summary(rec: dict) -> str:
    """`verifier_score=0.477±0.007 verifier_strict=0.141±0.010` (± the standard error where the record has one;
    the reward columns of a real-model run likewise)."""
    parts = []
    for c in eval_columns(rec):
        v, se = rec.get(f"eval_{c}"), rec.get(f"eval_{c}_se")
        if isinstance(v, int | float):
            parts.append(f"{c}={v:.3f}" + (f"±{se:.3f}" if isinstance(se, int | float) else ""))
    return " ".join(parts)


def eval_change(base: dict | None, final: dict | None) -> str:
    """The headline column's change from the evaluation before training to `final`, with the standard error of the
    difference sqrt(se_base² + se_final²) (the two are not treated as paired: a change of the weights redraws
    every image, so the set's own luck enters both), e.g. `verifier_score 0.477 → 0.512, change +0.035 ± 0.010`."""
    if not base or not final or base is final:
        return ""
    column = eval_columns(final)[0]
    b, f = base.get(f"eval_{column}"), final.get(f"eval_{column}")
    if not isinstance(b, int | float) or not isinstance(f, int | float):
        return ""
    sb, sf = base.get(f"eval_{column}_se"), final.get(f"eval_{column}_se")
    se = f" ± {(sb ** 2 + sf ** 2) ** 0.5:.3f}" if isinstance(sb, int | float) and isinstance(sf, int | float) else ""
    return f"{column} {b:.3f} → {f:.3f}, change {f - b:+.3f}{se}"


def eval_when(rec: dict) -> str:
    return "before training" if rec["iteration"] < 0 else f"after iteration {rec['iteration'] + 1}"


def method_label(config: dict) -> str:
    """The method a resolved config (its JSON form) runs, as the banner and the report name it: the preset's
    method, plus AWM's matching term when `grpo.matching_aux` adds it (the embedded default)."""
    method, aux = config.get("run", {}).get("method"), config.get("grpo", {}).get("matching_aux", 0)
    return f"{method} + AWM's matching term (grpo.matching_aux={aux:g})" if aux else str(method)


def ratio_text(rec: dict) -> str:
    """The progress line's ratio and clip fraction: the ratio's range as ratio − 1 (with ε ≈ 1e-4 a range printed to
    four decimals read [1.0000,1.0000]); nothing for AWM and DiffusionNFT, which have no ratio."""
    if rec.get("objective", "grpo") != "grpo":
        return ""
    return f"ratio-1=[{rec['ratio_min'] - 1:+.1e},{rec['ratio_max'] - 1:+.1e}] clip={rec['clip_frac']:.2f} "
