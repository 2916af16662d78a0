"""Ray dashboard metrics: every Gauge / Counter / Histogram the project exports, defined here and only here.

    tel = Telemetry(run="shapes-tiny-20261122-101500")      # a no-op when Ray is not initialised
    tel.record(train_updates(rec))                           # the driver, once per iteration
    tel.set("mixgrpo_rollout_images_per_second", 41.0, worker="0")

Metrics reach the node's Prometheus endpoint (`ray.nodes()[0]["MetricsExportPort"]`) with a `ray_` prefix
about 10 s after being set; counters gain a `_total` suffix, histograms `_bucket`/`_sum`/`_count`. Every
metric carries a `run` tag (the run directory's name) plus the tags listed in `METRICS`.

Why a refresh thread: Ray evicts a gauge that has not been set for two export intervals (~20 s), so on
a job whose iterations take minutes (SD3, FLUX) the dashboard would show gaps. `Telemetry` re-sets its
last gauge values every `refresh_s` seconds until `close()` (or the process ends).

The `*_updates` functions turn the run's records into (name, value, tags) triples: pure and unit-tested.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Update = tuple[str, float, dict[str, str]]  # (metric name, value, tags other than `run`)
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
PHASES = ("rollout_sample", "reward_wait", "update", "broadcast", "other")


@dataclass(frozen=True)
class MetricSpec:
    kind: Literal["gauge", "counter", "histogram"]
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


def _g(description: str, *tags: str) -> MetricSpec:
    return MetricSpec("gauge", description, tags)


def _c(description: str, *tags: str) -> MetricSpec:
    return MetricSpec("counter", description, tags)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

METRICS: dict[str, MetricSpec] = {
    # ---- the driver, from each iteration's record (learner/outputs/observers.py: MetricsObserver)
    "mixgrpo_iteration": _g("Last finished iteration (0-based)"),
    "mixgrpo_iterations": _c("Iterations finished"),
    "mixgrpo_reward_weighted_mean": _g("Weighted mean reward of the iteration's rollouts"),
    "mixgrpo_reward_mean": _g("Mean reward of the iteration's rollouts, per reward", "reward"),
    "mixgrpo_reward_std": _g("Standard deviation of the iteration's rewards, per reward", "reward"),
    "mixgrpo_window_start": _g("First SDE (trained) step of the iteration's window"),
    "mixgrpo_window_size": _g("Number of SDE (trained) steps in the window"),
    "mixgrpo_iteration_seconds": _g("Wall time of the last iteration"),
    "mixgrpo_phase_seconds": _g("Time per phase of the last iteration (rollout_sample, reward_wait, update, "
                                "broadcast, other)", "phase"),
    "mixgrpo_ratio": _g("Importance ratio pi/pi_old of the last update (mean, min, max)", "stat"),
    "mixgrpo_clip_fraction": _g("Fraction of clipped ratios in the last update"),
    "mixgrpo_grad_norm": _g("Mean gradient norm (before clipping) of the last update"),
    "mixgrpo_loss": _g("Mean GRPO loss of the last update"),
    "mixgrpo_approx_kl": _g("Approximate KL(pi_old || pi) of the last update"),
    "mixgrpo_weight_version": _g("Weight version after the last broadcast"),
    "mixgrpo_staleness": _g("Versions between the rollout's weights and the updated weights"),
    "mixgrpo_eval_verifier_score": _g("Held-out verifier score (partial credit, macro over categories)"),
    "mixgrpo_eval_verifier_strict": _g("Held-out verifier strict accuracy"),
    "mixgrpo_eval_category_score": _g("Held-out verifier score per prompt category", "category"),
    "mixgrpo_eval_reward": _g("Held-out mean of a reward (real models; tiny: run.eval_rewards)", "reward"),
    # ---- the learner actor
    "mixgrpo_learner_update_seconds": _g("Learner time of the last update"),
    "mixgrpo_learner_samples_per_second": _g("Rollout samples consumed per second of update"),
    "mixgrpo_learner_weight_version": _g("The learner's weight version"),
    # ---- rollout worker actors
    "mixgrpo_rollout_images_per_second": _g("Images sampled and scored per second of rollout", "worker"),
    "mixgrpo_rollout_sample_seconds": _g("Sampling time of the worker's last rollout", "worker"),
    "mixgrpo_rollout_reward_wait_seconds": _g("Time the last rollout waited for rewards after sampling", "worker"),
    "mixgrpo_rollout_images": _c("Images rolled out", "worker"),
    "mixgrpo_worker_weight_version": _g("Weight version the worker sampled with", "worker"),
    "mixgrpo_reward_latency_seconds": MetricSpec("histogram", "Reward request latency (submit to scores)",
                                                 ("reward", "worker"), LATENCY_BUCKETS),
    "mixgrpo_reward_requests": _c("Reward requests", "reward", "worker"),
    "mixgrpo_reward_retries": _c("Reward request retries (overload, 5xx, timeouts)", "reward", "worker"),
    "mixgrpo_reward_failures": _c("Reward requests that failed after all retries", "reward", "worker"),
    # ---- the window scheduler actor
    "mixgrpo_scheduler_iteration": _g("Iteration the window scheduler last advanced to"),
    "mixgrpo_scheduler_window_start": _g("The scheduler's current window start"),
    "mixgrpo_scheduler_window_size": _g("The scheduler's current window size"),
}

for _name in METRICS:  # Ray drops names outside the Prometheus pattern silently: fail at import instead
    if not PROMETHEUS_NAME.match(_name):
        raise ValueError(f"metric name {_name!r} does not match {PROMETHEUS_NAME.pattern}")


def exported_name(name: str) -> str:
    """What Prometheus shows for a metric: `ray_<name>`, plus `_total` for counters."""
    return f"ray_{name}" + ("_total" if METRICS[name].kind == "counter" else "")


def run_tag(output_dir: str | None, fallback: str) -> str:
    """The `run` tag: the run directory's name, sanitised like learner/main.py's run id."""
    name = Path(output_dir).resolve().name if output_dir else fallback
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


class Telemetry:
    """Sets the metrics of `METRICS` for one process; validates names and tags even when disabled."""

    def __init__(self, run: str, *, enabled: bool | None = None, refresh_s: float = 5.0) -> None:
        if enabled is None:
            import ray

            enabled = ray.is_initialized()
        self.run, self.enabled, self.refresh_s = run, enabled, refresh_s
        self._metrics: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple], tuple[float, dict[str, str]]] = {}  # last values, for refresh
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, name: str, value: float, **tags: str) -> None:
        self._emit(name, "gauge", float(value), tags)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value < 0:
            raise ValueError(f"counter {name}: cannot increase by {value} < 0")
        if value > 0:
            self._emit(name, "counter", float(value), tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._emit(name, "histogram", float(value), tags)

    def record(self, updates: Iterable[Update]) -> None:
        """Apply (name, value, tags) triples, each by its metric's kind (gauge: set, counter: inc, histogram: observe)."""
        methods = {"gauge": self.set, "counter": self.inc, "histogram": self.observe}
        for name, value, tags in updates:
            methods[_spec(name).kind](name, value, **tags)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------ internals
    def _emit(self, name: str, kind: str, value: float, tags: Mapping[str, str]) -> None:
        spec = _spec(name)
        if spec.kind != kind:
            raise TypeError(f"metric {name} is a {spec.kind}, not a {kind}")
        if set(tags) != set(spec.tags):
            raise ValueError(f"metric {name} takes tags {sorted(spec.tags)}, got {sorted(tags)}")
        if not self.enabled:
            return
        tags = {k: str(v) for k, v in tags.items()}
        metric = self._metric(name, spec)
        if kind == "gauge":
            metric.set(value, tags=tags)
            with self._lock:
                self._gauges[(name, tuple(sorted(tags.items())))] = (value, tags)
            self._start_refresh()
        elif kind == "counter":
            metric.inc(value, tags=tags)
        else:
            metric.observe(value, tags=tags)

    def _metric(self, name: str, spec: MetricSpec):
        with self._lock:
            if name not in self._metrics:
                from ray.util import metrics

                keys = ("run", *spec.tags)
                if spec.kind == "gauge":
                    m = metrics.Gauge(name, spec.description, tag_keys=keys)
                elif spec.kind == "counter":
                    m = metrics.Counter(name, spec.description, tag_keys=keys)
                else:
                    m = metrics.Histogram(name, spec.description, boundaries=list(spec.boundaries), tag_keys=keys)
                m.set_default_tags({"run": self.run})
                self._metrics[name] = m
            return self._metrics[name]

    def _start_refresh(self) -> None:
        if self._thread is None and self.refresh_s > 0 and not self._stop.is_set():
            self._thread = threading.Thread(target=self._refresh, name="telemetry-refresh", daemon=True)
            self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                last = [(name, v, tags) for (name, _), (v, tags) in self._gauges.items()]
            for name, value, tags in last:
                self._metrics[name].set(value, tags=tags)


def _spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; define it in services/telemetry.py METRICS")
    return METRICS[name]


def _num(rec: Mapping[str, Any], key: str) -> float | None:
    v = rec.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _present(pairs: Iterable[tuple[str, float | None, dict[str, str]]]) -> list[Update]:
    return [(n, v, t) for n, v, t in pairs if v is not None]


# ---------------------------------------------------------------------------------- record → metrics
def train_updates(rec: Mapping[str, Any]) -> list[Update]:
    """A train record of metrics.jsonl → the driver's gauges (absent or non-finite fields are skipped)."""
    timings = rec.get("rollout_timings") or {}
    phases = {"rollout_sample": _num(timings, "sample_s"), "reward_wait": _num(timings, "reward_wait_s"),
              "update": _num(rec, "update_s"), "broadcast": _num(rec, "broadcast_s")}
    total = _num(rec, "iteration_seconds")
    if total is not None:  # async rollouts overlap the update: the phases may add up to more than the total
        phases["other"] = max(0.0, total - sum(v for v in phases.values() if v is not None))
    rewards = [(k.split("/", 1)[1], k) for k in rec if k.startswith("reward_mean/")]
    return _present([
        ("mixgrpo_iteration", _num(rec, "iteration"), {}),
        ("mixgrpo_iterations", 1.0, {}),
        ("mixgrpo_reward_weighted_mean", _num(rec, "reward_mean"), {}),
        *[("mixgrpo_reward_mean", _num(rec, k), {"reward": r}) for r, k in rewards],
        *[("mixgrpo_reward_std", _num(rec, f"reward_std/{r}"), {"reward": r}) for r, _ in rewards],
        ("mixgrpo_window_start", _num(rec, "window_start"), {}),
        ("mixgrpo_window_size", _num(rec, "window_size"), {}),
        ("mixgrpo_iteration_seconds", total, {}),
        *[("mixgrpo_phase_seconds", v, {"phase": p}) for p, v in phases.items()],
        *[("mixgrpo_ratio", _num(rec, f"ratio_{s}"), {"stat": s}) for s in ("mean", "min", "max")],
        ("mixgrpo_clip_fraction", _num(rec, "clip_frac"), {}),
        ("mixgrpo_grad_norm", _num(rec, "grad_norm"), {}),
        ("mixgrpo_loss", _num(rec, "loss"), {}),
        ("mixgrpo_approx_kl", _num(rec, "approx_kl"), {}),
        ("mixgrpo_weight_version", _num(rec, "weight_version"), {}),
        ("mixgrpo_staleness", _num(rec, "staleness"), {}),
    ])


def eval_updates(rec: Mapping[str, Any]) -> list[Update]:
    """An eval record → held-out gauges: the verifier's (overall, strict, per category) and each reward's."""
    columns = rec.get("eval_columns") or []
    rewards = [c for c in columns if c not in ("verifier_score", "verifier_strict")]
    cats = [k[len("eval_"):-len("_score")] for k in rec if k.startswith("eval_") and k.endswith("_score")
            and k != "eval_verifier_score" and k[len("eval_"):] not in columns]
    return _present([
        ("mixgrpo_eval_verifier_score", _num(rec, "eval_verifier_score"), {}),
        ("mixgrpo_eval_verifier_strict", _num(rec, "eval_verifier_strict"), {}),
        *[("mixgrpo_eval_category_score", _num(rec, f"eval_{c}_score"), {"category": c}) for c in cats],
        *[("mixgrpo_eval_reward", _num(rec, f"eval_{r}"), {"reward": r}) for r in rewards],
    ])


def learner_updates(stats: Mapping[str, Any], rows: int) -> list[Update]:
    """The learner's update statistics (and the number of rows it consumed) → learner gauges."""
    seconds = _num(stats, "update_s")
    return _present([
        ("mixgrpo_learner_update_seconds", seconds, {}),
        ("mixgrpo_learner_samples_per_second", rows / seconds if seconds else None, {}),
        ("mixgrpo_learner_weight_version", _num(stats, "weight_version"), {}),
    ])


def rollout_updates(timings: Mapping[str, float], images: int, weight_version: int, worker: str) -> list[Update]:
    """One worker rollout (its batch's timings, number of images, weight version) → worker metrics."""
    tag = {"worker": worker}
    total = _num(timings, "rollout_s")
    return _present([
        ("mixgrpo_rollout_images_per_second", images / total if total else None, tag),
        ("mixgrpo_rollout_sample_seconds", _num(timings, "sample_s"), tag),
        ("mixgrpo_rollout_reward_wait_seconds", _num(timings, "reward_wait_s"), tag),
        ("mixgrpo_rollout_images", float(images), tag),
        ("mixgrpo_worker_weight_version", float(weight_version), tag),
    ])


def reward_counter_updates(before: Mapping[str, int], after: Mapping[str, int], worker: str) -> list[Update]:
    """`RewardClient.metrics()` snapshots (cumulative `<reward>/<counter>`) → counter increments since `before`."""
    metric = {"requests": "mixgrpo_reward_requests", "retries": "mixgrpo_reward_retries",
              "failures": "mixgrpo_reward_failures"}
    out: list[Update] = []
    for key, count in sorted(after.items()):
        reward, _, counter = key.rpartition("/")
        delta = count - before.get(key, 0)
        if reward and counter in metric and delta > 0:
            out.append((metric[counter], float(delta), {"reward": reward, "worker": worker}))
    return out


def scheduler_updates(iteration: int, window: tuple[int, int]) -> list[Update]:
    return [("mixgrpo_scheduler_iteration", float(iteration), {}),
            ("mixgrpo_scheduler_window_start", float(window[0]), {}),
            ("mixgrpo_scheduler_window_size", float(window[1]), {})]
