"""The run report: <run>/report.md with PNG plots in <run>/report/, from metrics.jsonl and the sample grids.

    python -m learner.tools.report runs/shapes-tiny-20261122-101500      # also written when a run ends

Plots: rewards and the held-out evaluation over training, the window position, the time of each
iteration by phase (rollout sampling, reward wait, learner update, weight broadcast, other), and the
first and last sample grids side by side. The summary table compares the base model (the evaluation
before training) with the final one and gives the iteration count and median seconds per iteration.
x axes count updates applied (iteration + 1; the base evaluation is at 0), as in TensorBoard.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .grids import list_grids, load_grid
from .metrics import MetricsLog, eval_columns, method_label

PHASES = {"rollout sample": ("rollout_timings", "sample_s"), "reward wait": ("rollout_timings", "reward_wait_s"),
          "update": (None, "update_s"), "next rollout's rest (async)": (None, "next_rollout_wait_s"),
          "broadcast": (None, "broadcast_s")}
PLOT_DIR = "report"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _y(v: Any) -> float:
    """A plotted value: missing (or written as text, like "nan") → NaN, a gap in the line."""
    n = _num(v)
    return float("nan") if n is None else n


def load_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of <run>/metrics.jsonl, each in iteration order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    recs = MetricsLog(path).records()
    train = sorted((r for r in recs if r.get("kind") == "train"), key=lambda r: r["iteration"])
    evals = sorted((r for r in recs if r.get("kind") == "eval"), key=lambda r: r["iteration"])
    return train, evals


def phase_seconds(rec: dict) -> dict[str, float]:
    """Seconds per phase of one train record; "other" is the rest of iteration_seconds (never negative)."""
    out = {}
    for name, (section, key) in PHASES.items():
        v = _num((rec.get(section) or {}).get(key) if section else rec.get(key))
        out[name] = v or 0.0
    out["other"] = max(0.0, (_num(rec.get("iteration_seconds")) or 0.0) - sum(out.values()))
    return out


# ---------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_rewards(train: list[dict], evals: list[dict], path: Path) -> Path:
    """Training rewards (weighted mean and each reward) and the held-out evaluation's overall columns."""
    plt = _pyplot()
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["iteration"] + 1 for r in train]
    if train:
        ax_r.plot(x, [_y(r.get("reward_mean")) for r in train], label="weighted mean", lw=2)
        for key in sorted({k for r in train for k in r if k.startswith("reward_mean/")}):
            ax_r.plot(x, [_y(r.get(key)) for r in train], label=key.removeprefix("reward_mean/"), alpha=0.8)
        ax_r.legend(fontsize=8)
    ax_r.set(title="training reward (rollouts)", xlabel="updates applied", ylabel="reward")
    xe = [r["iteration"] + 1 for r in evals]
    for col in dict.fromkeys(c for r in evals for c in eval_columns(r)):
        ax_e.plot(xe, [_y(r.get(f"eval_{col}")) for r in evals], marker="o", label=col.replace("_", " "))
    ax_e.set(title="held-out evaluation", xlabel="updates applied")
    if evals:
        ax_e.legend(fontsize=8)
    return _save(fig, path)


def plot_window(train: list[dict], path: Path) -> Path:
    """The window [start, start + size) of each iteration over the denoising steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["iteration"] + 1 for r in train]
    start = [r["window_start"] for r in train]
    end = [r["window_start"] + r["window_size"] for r in train]
    ax.fill_between(x, start, end, step="mid", alpha=0.35, label="window steps")
    ax.step(x, start, where="mid", label="window start")
    ax.set(title="sliding window", xlabel="updates applied", ylabel="denoising step")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_time(train: list[dict], path: Path) -> Path:
    """Stacked bars: seconds of each iteration by phase."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = [r["iteration"] + 1 for r in train]
    bottom = [0.0] * len(train)
    for phase in (*PHASES, "other"):
        h = [phase_seconds(r)[phase] for r in train]
        ax.bar(x, h, bottom=bottom, label=phase, width=0.9)
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.set(title="time per iteration", xlabel="updates applied", ylabel="seconds")
    ax.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return _save(fig, path)


def plot_grids(first: Path, last: Path, path: Path) -> Path:
    """The first and the last sample grid side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    for ax, png in zip(axes, (first, last)):
        grid, meta = load_grid(png)
        ax.imshow(grid, interpolation="nearest")
        it = meta["iteration"]
        ax.set_title("before training" if it < 0 else f"after iteration {it} ({it + 1} updates)")
        ax.axis("off")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- text
def _fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _pm(v: float | None, se: float | None) -> str:
    return _fmt(v) + (f" ± {se:.3f}" if v is not None and se is not None else "")


def summary_table(train: list[dict], evals: list[dict]) -> str:
    """Base vs final held-out evaluation (overall columns ± standard error, per category), iterations, median
    s/iteration."""
    base = next((e for e in evals if e["iteration"] < 0), None)
    final = evals[-1] if evals and evals[-1]["iteration"] >= 0 else None
    rows = ["| | base | final | change |", "|---|---|---|---|"]
    keys = [f"eval_{c}" for c in dict.fromkeys(c for e in evals for c in eval_columns(e))]
    keys += sorted({k for e in evals for k in e if k.startswith("eval_") and k.endswith("_score")} - set(keys))
    for key in keys:
        b, f = _num((base or {}).get(key)), _num((final or {}).get(key))
        sb, sf = _num((base or {}).get(f"{key}_se")), _num((final or {}).get(f"{key}_se"))
        label = key.removeprefix("eval_").replace("_", " ")
        change = _fmt(f - b if None not in (b, f) else None, True)
        if None not in (b, f, sb, sf):  # the standard error of the difference, the two sets' luck unpaired
            change += f" ± {(sb ** 2 + sf ** 2) ** 0.5:.3f}"
        rows.append(f"| held-out {label} | {_pm(b, sb)} | {_pm(f, sf)} | {change} |")
    secs = [s for r in train if (s := _num(r.get("iteration_seconds"))) is not None]
    rows.append(f"| iterations | | {len(train)} | |")
    rows.append(f"| median s/iteration | | {statistics.median(secs):.2f} | |" if secs else "| median s/iteration | | – | |")
    if train:
        rows.append(f"| total iteration time (min) | | {sum(secs) / 60:.1f} | |")
        rows.append(f"| final weight version | | {train[-1].get('weight_version', '–')} | |")
        nfe = [int(n) for r in train if (n := _num(r.get("nfe"))) is not None]
        if nfe:  # model evaluations per rollout image: Flash's fall as the window moves (DPM-Solver++ after it)
            rows.append(f"| rollout NFE per image (first → last iteration) | | {nfe[0]} → {nfe[-1]} | |")
    return "\n".join(rows)


def phase_table(train: list[dict]) -> str:
    phases = [phase_seconds(r) for r in train]
    lines = ["| phase | median s | share |", "|---|---|---|"]
    total = sum(sum(p.values()) for p in phases) or 1.0
    for name in (*PHASES, "other"):
        vals = [p[name] for p in phases]
        if name not in ("update", "other") and not any(vals):  # a phase this run does not have (sync: no overlap)
            continue
        lines.append(f"| {name} | {statistics.median(vals):.2f} | {100 * sum(vals) / total:.0f}% |")
    return "\n".join(lines)


def prompts_table(first: Path, last: Path) -> str:
    (_, a), (_, b) = load_grid(first), load_grid(last)
    sa, sb = a.get("scores") or [None] * len(a["prompts"]), b.get("scores") or [None] * len(b["prompts"])
    lines = ["| cell | prompt | first | last |", "|---|---|---|---|"]
    for i, p in enumerate(a["prompts"]):
        r, c = divmod(i, a["cols"])
        lines.append(f"| ({r},{c}) | {p} | {_fmt(sa[i])} | {_fmt(sb[i] if i < len(sb) else None)} |")
    return "\n".join(lines)


def _header(run_dir: Path) -> str:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return f"# Run report: {run_dir.name}\n"
    cfg = json.loads(cfg_path.read_text())
    run, model, win = cfg.get("run", {}), cfg.get("model", {}), cfg.get("window", {})
    return (f"# Run report: {run_dir.name}\n\nmethod **{method_label(cfg)}**, backend **{model.get('backend')}**, "
            f"{run.get('iterations')} iterations configured, window {window_text(win)}, "
            f"{cfg.get('sampler', {}).get('num_steps')} sampling steps, seed {run.get('seed')}\n")


def window_text(win: dict) -> str:
    """The window schedule in words, naming only the fields its strategy reads (`learner.algo.window_at`)."""
    strategy, size, start = win.get("strategy"), win.get("size"), win.get("start", 0)
    tau, stride = win.get("shift_interval"), win.get("stride")
    if strategy == "frozen" or (strategy == "progressive" and stride == 0):
        return f"frozen at steps [{start}, {start + size})" if isinstance(size, int) else f"frozen (size {size})"
    if strategy == "random":
        return f"random (size {size}, a fresh uniform start every iteration)"
    moves = f"size {size}, from step {start}, {stride} step(s) every"
    if strategy == "linear_decay":
        return f"linear_decay ({moves} {tau} → {win.get('shift_interval_min')} iterations as it moves)"
    if strategy == "exp_decay":
        return (f"exp_decay ({moves} ⌈{tau}·exp(−{win.get('decay_rate')}·(l − {win.get('decay_threshold')}))⌉ "
                f"iterations past step {win.get('decay_threshold')})")
    return f"{strategy} ({moves} {tau} iterations)"


def write_report(run_dir: str | Path) -> Path:
    """Render <run>/report.md and its plots; returns the report's path."""
    run_dir = Path(run_dir)
    train, evals = load_records(run_dir)
    plots = run_dir / PLOT_DIR
    parts = [_header(run_dir), "## Summary\n", summary_table(train, evals)]
    if train or evals:
        plot_rewards(train, evals, plots / "rewards.png")
        parts += ["\n## Rewards and the held-out evaluation\n", f"![rewards]({PLOT_DIR}/rewards.png)"]
    if train:
        plot_window(train, plots / "window.png")
        plot_time(train, plots / "time.png")
        parts += ["\n## Window position\n", f"![window]({PLOT_DIR}/window.png)",
                  "\n## Time per iteration\n", f"![time]({PLOT_DIR}/time.png)\n", phase_table(train)]
    grids = list_grids(run_dir)
    if grids:
        plot_grids(grids[0], grids[-1], plots / "samples.png")
        parts += ["\n## Samples: first and last evaluation\n",
                  "Same held-out prompts and starting noise in every grid (cells row by row).\n",
                  f"![samples]({PLOT_DIR}/samples.png)\n", prompts_table(grids[0], grids[-1])]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts) + "\n")
    return out
