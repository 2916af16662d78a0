"""MixGRPO-Ray driver: config → cluster → loop → cleanup.

    python learner/main.py                                   # the embedded default (deploy/configs/tiny_cpu.yaml)
    python learner/main.py --config mixgrpo_flash window.size=6 run.iterations=100
    python learner/main.py --config flux_dev --config mixgrpo # real models from local folders, on a cluster
    python learner/main.py --resume runs/shapes-tiny-20261122-101500 [run.iterations=120]
    ray job submit --working-dir . -- python learner/main.py --config mixgrpo run.iterations=5

Without --config the run is the embedded default, `tiny_cpu` (the tiny model in the shapes world on a CPU:
MixGRPO with AWM's matching term, grpo.matching_aux = 1); with --config, the presets named, in order, on top of
the built-in defaults. Connects to the cluster in `cluster.address` or RAY_ADDRESS (set inside `ray job submit`), else
starts a local Ray. Writes <output_dir>/config.json, metrics.jsonl and checkpoints/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# `python learner/main.py` puts learner/ on sys.path, not the repository root. The root goes first, so the driver
# runs this checkout's packages, as its actors do (`ray_session`), and not another checkout's `pip install -e`.
if sys.path[:1] != [str(REPO_ROOT)]:
    sys.path.insert(0, str(REPO_ROOT))

try:
    from services.config import ClusterConfig, Config, ConfigError, dump_config, load_config
except ModuleNotFoundError as e:  # a dependency is missing
    sys.exit(f"error: cannot import the project's packages ({e}); run `pip install -e .` in the repository root")
EMBEDDED_DEFAULT = "tiny_cpu"  # the preset a run without --config takes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="preset name (deploy/configs/<name>.yaml) or YAML file; repeatable, merged in order")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. window.size=6 run.seed=1")
    return p.parse_args(argv)


def default_runs_root(repo_root: Path) -> Path:
    """Where a run without `run.output_dir` writes: <checkout>/runs, except when the checkout is a Ray job's unpacked
    working_dir (`ray job submit --working-dir`), which Ray deletes after the job with everything in it: then
    ~/mixgrpo-runs on the node the driver runs on."""
    if "runtime_resources" in repo_root.parts or any(part.startswith("_ray_pkg_") for part in repo_root.parts):
        return Path.home() / "mixgrpo-runs"
    return repo_root / "runs"


def resolve(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """The config and output folder of a new run, or of the run being resumed."""
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.json").is_file():
            raise ConfigError(f"--resume {out}: no config.json there (is it a run directory?)")
        if args.config:
            raise ConfigError("--resume takes the run's own config.json; pass only dotted overrides")
        from learner.driver.resume import check_resume

        cfg = load_config([out / "config.json"], args.overrides)
        check_resume(out, load_config([out / "config.json"], []), cfg)
        return cfg, out, True
    cfg = load_config(args.config or [EMBEDDED_DEFAULT], args.overrides)
    out = Path(cfg.run.output_dir or default_runs_root(REPO_ROOT) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"run.output_dir {out} already holds checkpoints: use --resume {out} or another folder")
    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
        raise ConfigError(f"run.output_dir {out} already holds a run's records (metrics.jsonl) and no checkpoint to "
                          "resume from: choose another folder (a new run there would append to them)")
    cfg.run.output_dir = str(out)
    return cfg, out, False


def resume_hint(out: Path) -> str:
    """What an interrupted run can do next: resume from its last checkpoint, or (none yet) start again elsewhere."""
    from learner.training import latest_checkpoint

    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return f"No checkpoint was written yet (learner.checkpoint_every); start again in a new folder, not {out}."
    return f"python learner/main.py --resume {out} continues from {ckpt.name}."


def preflight(cfg: Config) -> None:
    """Before any actor starts: read the prompt files (a bad one is an error naming it, not a dead actor) and
    estimate each role's GPU memory from the model's configs (a config that cannot fit is refused, naming the
    fields to change: learner/driver/preflight.py)."""
    from learner.driver.preflight import check_memory, micro_batch_advice, table
    from learner.evaluation import run_prompts
    from reward_servers.scorers import check_reward_specs, reward_weight_problems
    from services.prompts import PromptSource

    if cfg.reward.server.transport == "handle":  # before Ray and Serve start, not a traceback from the Serve deploy
        check_reward_specs(cfg.reward.rewards)
        if unset := reward_weight_problems(cfg.reward.rewards)[0]:  # (an absent folder needs to know local or not)
            raise ConfigError("; ".join(unset))
    readers = {"rollout.prompts_file": lambda: PromptSource(cfg.rollout.prompts, cfg.run.seed, cfg.rollout.prompts_file,
                                                            shapes_grammar=cfg.model.backend == "tiny"),
               "run.eval_prompts_file": lambda: run_prompts(cfg)}
    for field, read in readers.items():
        try:
            read()
        except (FileNotFoundError, ValueError) as e:  # name the field to change, not only the path
            raise ConfigError(f"{field}: {e}") from None
    if cfg.run.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError('run.wandb_project is set but wandb is not installed: pip install -e ".[wandb]"') from None
    estimates = check_memory(cfg)
    if any(r.capacity_gb is not None for r in estimates):
        print(f"memory preflight (estimates):\n{table(estimates)}", flush=True)
        if advice := micro_batch_advice(cfg):
            print(advice, flush=True)


@contextmanager
def ray_session(cluster: ClusterConfig):
    import ray

    if ray.is_initialized():
        yield False
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cluster.namespace)
    else:
        from reward_servers.app import patient_proxy_start

        patient_proxy_start()  # Serve's HTTP proxy on a busy machine
        # actors import the project's packages even without `pip install -e .`
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=cluster.dashboard, namespace=cluster.namespace)
    try:
        yield not address  # True: this process started the (local) cluster, nothing will join it
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, out, resuming = resolve(args)
        preflight(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.json")
    from learner.outputs.metrics import eval_change, eval_summary, method_label

    print(f"MixGRPO-Ray: method={method_label(cfg.model_dump(mode='json'))} backend={cfg.model.backend} "
          f"iterations={cfg.run.iterations} → {out}", flush=True)
    runs_root = default_runs_root(REPO_ROOT)
    if runs_root != REPO_ROOT / "runs" and out.parent == runs_root:
        print(f"note: run.output_dir is not set and this job runs from Ray's unpacked working_dir, which Ray deletes "
              f"after the job; outputs go to {out} on this node instead (set run.output_dir to choose)", flush=True)
    import ray

    from learner.driver.cluster_checks import check_resources, check_reward_service, check_state_store
    from learner.driver.loop import run_loop
    from learner.outputs.observers import default_observers
    from reward_servers.service import reward_service

    run_id = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in out.resolve().name)
    t0 = time.perf_counter()
    try:
        with ray_session(cfg.cluster) as local:
            check_resources(cfg, ray.cluster_resources(), local=local)
            check_state_store(cfg.cluster.state_store, local=local)
            check_reward_service(cfg.reward, local=local)
            with reward_service(cfg.reward):
                observers = default_observers(out, run_id, wandb_project=cfg.run.wandb_project,
                                              config=cfg.model_dump(mode="json"))
                result = run_loop(cfg, out, run_id, resume=resuming, observers=observers,
                                  resources_checked=True)
    except ConfigError as e:  # found on the cluster (its resources, a Serve app of the same name): no run started
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: Ray and Serve are down (the with-blocks above); say how to go on
        print(f"\ninterrupted. {resume_hint(out)}", file=sys.stderr, flush=True)
        return 130
    final = eval_summary(result["final_eval"]) if result["final_eval"] else "no final evaluation"
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; held-out {final}; outputs in {out}", flush=True)
    change = eval_change(result.get("base_eval"), result["final_eval"])
    if change:
        n = result["final_eval"].get("eval_num_prompts", "?")
        print(f"held-out ({n} prompts, ± standard error): {change}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
