"""Observers of the driver loop: Ray dashboard metrics, TensorBoard and wandb scalars and sample grids, the report.

    observers = default_observers(out, run_id)               # metrics + TensorBoard + report at the end
    observers = default_observers(out, run_id, wandb_project="mixgrpo", config=cfg_dict)   # + wandb
    run_loop(cfg, out, run_id, resume, observers=observers)

Each observer has `on_iteration(rec, samples=None)`, `on_eval(rec, images=None, prompts=None)` and `close()` (the
`Observer` hooks); records are the dicts of <run>/metrics.jsonl. `samples` are a few of the iteration's rollout
images (`rollout.log_images`; `RolloutBatch.logged_samples`: images, prompts, rewards by name), logged by
TensorBoard and wandb as "samples/rollout" and not written to the record. An eval record's sample grid arrives
either as arrays (`images` (k, H, W, 3) uint8, `prompts`) or, when the loop passes only the record,
through `rec["samples"]`, the grid PNG (relative to the run directory) that `learner.driver.loop.evaluate`
saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.telemetry import Telemetry, eval_updates, train_updates

from .grids import default_scale, load_grid, make_grid

SKIP = {"kind", "iteration", "time", "samples"}


class Observer:
    """Hooks the loop calls with every record (metrics, TensorBoard, grids, reports plug in here)."""

    def on_iteration(self, rec: dict, samples: dict | None = None) -> None: ...

    def on_eval(self, rec: dict, images=None, prompts=None) -> None: ...

    def on_rewind(self, iteration: int) -> None:
        """Optional: the records after `iteration` were dropped and will be written again (`rewind`)."""

    def close(self) -> None: ...


class MetricsObserver:
    """The driver's Ray metrics (see services/telemetry.py); a no-op without a Ray session."""

    def __init__(self, run: str, telemetry: Telemetry | None = None) -> None:
        self.telemetry = telemetry or Telemetry(run)

    def on_iteration(self, rec: dict, samples: dict | None = None) -> None:
        self.telemetry.record(train_updates(rec))

    def on_eval(self, rec: dict, images=None, prompts=None) -> None:
        self.telemetry.record(eval_updates(rec))

    def close(self) -> None:
        self.telemetry.close()


def scalar_tag(key: str) -> str:
    """A record key → a TensorBoard tag grouped by what it measures (reward/, update/, time/, window/, train/)."""
    if key.startswith("reward"):
        return f"reward/{key.removeprefix('reward_')}"
    if key.startswith(("window_", "trained_")):
        return f"window/{key.removeprefix('window_')}"
    if key.endswith(("_s", "_seconds")) or key.startswith("rollout_timings/"):
        return f"time/{key.removeprefix('rollout_timings/')}"
    if key.startswith(("ratio", "clip", "grad", "loss", "approx_kl", "adv", "first_ratio", "num_updates")):
        return f"update/{key}"
    return f"train/{key}"


def scalars(rec: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (nested dicts flattened, lists and text skipped) by TensorBoard tag."""
    flat: dict[str, Any] = {}
    for k, v in rec.items():
        if k in SKIP:
            continue
        if isinstance(v, Mapping):
            flat |= {f"{k}/{sub}": x for sub, x in v.items()}
        else:
            flat[k] = v
    numbers = {k: float(v) for k, v in flat.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if rec.get("kind") == "eval":
        return {f"eval/{k.removeprefix('eval_')}": v for k, v in numbers.items()}
    return {scalar_tag(k): v for k, v in numbers.items()}


def step_of(rec: Mapping[str, Any]) -> int:
    """TensorBoard step = updates applied: iteration m's record is step m+1; the base evaluation is step 0."""
    return int(rec["iteration"]) + 1


def prompts_markdown(prompts: Sequence[str], scores: Sequence[float] | None = None, cols: int | None = None) -> str:
    """A Markdown table: cell (row, col) → prompt (→ verifier score)."""
    cols = cols or math.ceil(math.sqrt(len(prompts)))
    head = "| cell | prompt |" + (" score |" if scores is not None else "")
    lines = [head, "|---|---|" + ("---|" if scores is not None else "")]
    for i, p in enumerate(prompts):
        r, c = divmod(i, cols)
        lines.append(f"| ({r},{c}) | {p} |" + (f" {scores[i]:.2f} |" if scores is not None else ""))
    return "\n".join(lines)


def open_summary_writer(logdir: Path, writer: str = "auto", purge_step: int | None = None):
    """torch.utils.tensorboard's SummaryWriter when `tensorboard` is installed, else tensorboardX's (a Ray
    dependency that writes the same event files without TensorBoard). With `purge_step`, TensorBoard hides the
    events of that step and later that earlier files of the folder hold (a resumed or replayed run's)."""
    kw = {} if purge_step is None else {"purge_step": purge_step, "filename_suffix": f".from-step-{purge_step}"}
    if writer in ("auto", "torch"):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(logdir), **kw)
        except ImportError:
            if writer == "torch":
                raise
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir), **kw)


def rollout_caption(samples: Mapping[str, Any]) -> str:
    """A Markdown table of the logged rollout images: cell → prompt → each reward."""
    names = list(samples.get("rewards") or {})
    cols = math.ceil(math.sqrt(len(samples["prompts"])))
    lines = ["| cell | prompt |" + "".join(f" {n} |" for n in names), "|---|---|" + "---|" * len(names)]
    for i, p in enumerate(samples["prompts"]):
        r, c = divmod(i, cols)
        lines.append(f"| ({r},{c}) | {p} |" + "".join(f" {samples['rewards'][n][i]:.3f} |" for n in names))
    return "\n".join(lines)


def rollout_grid(samples: Mapping[str, Any]) -> np.ndarray:
    images = np.asarray(samples["images"])
    return make_grid(images, scale=default_scale(images.shape[1]))


def eval_grid(run_dir: Path, rec: dict, images, prompts) -> tuple[np.ndarray | None, list[str], list[float] | None]:
    """An eval record's sample grid: from the arrays passed, else the PNG the loop saved (`rec["samples"]`)."""
    if images is not None:
        images = np.asarray(images)
        return make_grid(images, scale=default_scale(images.shape[1])), list(prompts or []), None
    if rec.get("samples"):
        grid, meta = load_grid(run_dir / rec["samples"])
        return grid, meta["prompts"], meta.get("scores")
    return None, [], None


class TensorBoardObserver:
    """Scalars of every record, each iteration's logged rollout images (with their prompts and rewards) and each
    evaluation's sample grid + prompts under <run>/tensorboard/."""

    def __init__(self, run_dir: str | Path, writer: str = "auto") -> None:
        self.run_dir, self.kind = Path(run_dir), writer
        self._writer, self._purge_step = None, None

    @property
    def writer(self):
        """The event file's writer, opened at the first event (after a resume's `on_rewind`, purging)."""
        if self._writer is None:
            self._writer = open_summary_writer(self.run_dir / "tensorboard", self.kind, self._purge_step)
        return self._writer

    def on_rewind(self, iteration: int) -> None:
        """The records after `iteration` are dropped (a resume, a learner's replay): a new event file purges their
        steps, so the curves do not hold the dropped iterations beside the ones that replace them."""
        self.close()
        self._writer, self._purge_step = None, iteration + 2  # step_of(iteration + 1's record)

    def on_iteration(self, rec: dict, samples: dict | None = None) -> None:
        step = step_of(rec)
        for tag, v in scalars(rec).items():
            self.writer.add_scalar(tag, v, step)
        if samples:
            self.writer.add_image("samples/rollout", rollout_grid(samples), step, dataformats="HWC")
            self.writer.add_text("samples/rollout_prompts", rollout_caption(samples), step)
        self.writer.flush()

    def on_eval(self, rec: dict, images=None, prompts=None) -> None:
        step = step_of(rec)
        for tag, v in scalars(rec).items():
            self.writer.add_scalar(tag, v, step)
        grid, prompts, scores = eval_grid(self.run_dir, rec, images, prompts)
        if grid is not None:
            self.writer.add_image("samples/heldout", grid, step, dataformats="HWC")
            self.writer.add_text("samples/prompts", prompts_markdown(prompts, scores), step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class WandbObserver:
    """The same scalars (TensorBoard's tags and steps) and each evaluation's sample grid in a wandb run.

    `pip install -e ".[wandb]"`; wandb's own settings apply (`WANDB_MODE=offline` writes the run under
    <run>/wandb/ for `wandb sync` later, `WANDB_API_KEY` or `wandb login` for online). One wandb run per driver
    process: a resumed run starts a new one, named after the run directory.
    """

    def __init__(self, run_dir: str | Path, run_id: str, project: str, config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError('run.wandb_project is set but wandb is not installed: pip install -e ".[wandb]"') from e
        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.run = wandb.init(project=project, name=run_id, dir=str(self.run_dir), config=dict(config or {}),
                              reinit="create_new")

    def on_iteration(self, rec: dict, samples: dict | None = None) -> None:
        data: dict[str, Any] = dict(scalars(rec))
        if samples:
            data["samples/rollout"] = self.wandb.Image(rollout_grid(samples), caption=rollout_caption(samples))
        self.run.log(data, step=step_of(rec))

    def on_eval(self, rec: dict, images=None, prompts=None) -> None:
        data: dict[str, Any] = dict(scalars(rec))
        grid, prompts, scores = eval_grid(self.run_dir, rec, images, prompts)
        if grid is not None:
            data["samples/heldout"] = self.wandb.Image(grid, caption=prompts_markdown(prompts, scores))
        self.run.log(data, step=step_of(rec))

    def close(self) -> None:
        self.run.finish()


class ReportObserver:
    """Writes <run>/report.md when the run ends (`python -m learner.tools.report RUN_DIR` does the same any time).

    A report that cannot be written is reported on stderr, not raised: the run's results are on disk
    already and the close() runs in the loop's `finally`, where raising would hide the run's own error.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_iteration(self, rec: dict, samples: dict | None = None) -> None: ...

    def on_eval(self, rec: dict, images=None, prompts=None) -> None: ...

    def close(self) -> None:
        import sys

        from .report import write_report

        try:
            path = write_report(self.run_dir)
            print(f"report: {path}", flush=True)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            print(f"report: not written ({type(e).__name__}: {e}); retry with "
                  f"`python -m learner.tools.report {self.run_dir}`", file=sys.stderr, flush=True)


def rewind(observers: Sequence[Any], iteration: int) -> None:
    """Tell the observers that have an `on_rewind(iteration)` hook that the run continues after `iteration`."""
    for obs in observers:
        hook = getattr(obs, "on_rewind", None)
        if hook is not None:
            hook(iteration)


def default_observers(run_dir: str | Path, run_id: str, *, tensorboard: bool = True, report: bool = True,
                      wandb_project: str | None = None, config: Mapping[str, Any] | None = None) -> list:
    """What learner/main.py passes to `run_loop`: metrics, TensorBoard, wandb (with a project), the report."""
    observers: list = [MetricsObserver(run_id)]
    if tensorboard:
        observers.append(TensorBoardObserver(run_dir))
    if wandb_project:
        observers.append(WandbObserver(run_dir, run_id, wandb_project, config))
    if report:
        observers.append(ReportObserver(run_dir))
    return observers
