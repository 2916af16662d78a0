"""deploy/ agrees with the code: every manifest parses, KubeRay objects have their required fields,
entrypoints and import paths point at real files and callables, configs and reward specs validate,
mounts cover the paths the configs read and write. No Ray cluster is started."""

import importlib
import json
import shlex
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.config import RewardServerConfig, RewardSpec, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY_FILES = sorted((DEPLOY / "kuberay").glob("*.yaml"))
RAY_VERSION = version("ray")


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_objects(kind: str) -> list[dict]:
    objs = [d for p in KUBERAY_FILES for d in docs_of(p) if d.get("kind") == kind]
    assert objs, f"no {kind} under deploy/kuberay"
    return objs


def cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of every RayCluster, RayJob and RayService."""
    return ([(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in kuberay_objects("RayCluster")]
            + [(f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for o in kuberay_objects("RayJob")]
            + [(f"RayService/{o['metadata']['name']}", o["spec"]["rayClusterConfig"])
               for o in kuberay_objects("RayService")])


def pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def mounts(pod: dict) -> dict[str, bool]:
    """mountPath → read-only, over the pod's containers."""
    return {m["mountPath"]: m.get("readOnly", False) for c in pod["containers"] for m in c.get("volumeMounts", [])}


def under_mount(path: str, pod: dict, *, writable: bool) -> bool:
    p = PurePosixPath(path)
    return any(p.is_relative_to(m) and (not ro or not writable) for m, ro in mounts(pod).items())


def serve_configs() -> list[tuple[str, dict]]:
    found = [(f"RayService/{o['metadata']['name']}", yaml.safe_load(o["spec"]["serveConfigV2"]))
             for o in kuberay_objects("RayService")]
    if (DEPLOY / "serve_rewards.yaml").exists():  # another engineer's file; checked when present
        found.append(("serve_rewards.yaml", yaml.safe_load((DEPLOY / "serve_rewards.yaml").read_text())))
    return found


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses_and_is_commented(path):
    docs = docs_of(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    assert path.read_text().lstrip().startswith("#"), f"{path}: start with a comment saying what it is"


def test_readme_covers_every_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for path in [*KUBERAY_FILES, DEPLOY / "cluster-launcher.yaml", DEPLOY / "runtime_env.yaml"]:
        assert str(path.relative_to(REPO)) in readme, f"deploy/README.md does not mention {path.name}"
    assert "RAY_REDIS_ADDRESS" in readme and "RAY_AUTH_MODE" in readme and "MIXGRPO_REWARD_TOKEN" in readme


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind, required", [("RayJob", ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"]),
                                            ("RayService", ["serveConfigV2", "rayClusterConfig"]),
                                            ("RayCluster", ["headGroupSpec", "workerGroupSpecs"])])
def test_kuberay_objects_have_required_fields(kind, required):
    for obj in kuberay_objects(kind):
        assert obj["apiVersion"] == "ray.io/v1" and obj["metadata"]["name"]
        missing = [f for f in required if f not in obj["spec"]]
        assert not missing, f"{kind} {obj['metadata']['name']}: missing spec fields {missing}"


@pytest.mark.parametrize("label, cluster", [pytest.param(*c, id=c[0]) for c in cluster_specs()])
def test_cluster_specs(label, cluster):
    assert cluster["rayVersion"] == RAY_VERSION, f"{label}: rayVersion must match the pinned ray"
    assert cluster["authOptions"]["mode"] == "token", f"{label}: token auth off"
    assert "rayStartParams" in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{label}: replica bounds"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert any(gpus), f"{label}: no GPU worker group"
    for pod in pod_specs(cluster):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] and c["resources"]["limits"], f"{label}: container {c['name']} needs image and limits"
            unknown = {m["name"] for m in c.get("volumeMounts", [])} - volumes
            assert not unknown, f"{label}: volumeMounts without a volume: {unknown}"


def test_gcs_fault_tolerance_points_at_the_redis_manifest():
    redis = {d["kind"]: d for d in docs_of(DEPLOY / "kuberay" / "redis.yaml")}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= redis.keys()
    svc, dep = redis["Service"], redis["Deployment"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (secret_ref,) = [e["valueFrom"]["secretKeyRef"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "REDIS_PASSWORD"]
    address = f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    ft_specs = [(label, c["gcsFaultToleranceOptions"]) for label, c in cluster_specs() if "gcsFaultToleranceOptions" in c]
    assert any(label.startswith("RayCluster/") for label, _ in ft_specs)
    for label, ft in ft_specs:
        assert ft["redisAddress"] == address, f"{label}: redisAddress is not the Service in redis.yaml"
        assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == secret_ref, f"{label}: not Redis's password Secret"
    (cluster,) = kuberay_objects("RayCluster")
    assert cluster["spec"]["gcsFaultToleranceOptions"]["externalStorageNamespace"]


def test_rayjob_entrypoint_runs_the_driver_with_valid_configs():
    from learner.main import parse_args  # the driver's own argument parser (imports only the config)

    for job in kuberay_objects("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), f"entrypoint script {argv[1]} not in the repo"
        args = parse_args(argv[2:])
        assert args.config, "the training entrypoint should name its configs"
        for c in args.config:
            assert c.endswith(".yaml") and (REPO / c).is_file(), f"--config {c} not in the repo"
        cfg = load_config([REPO / c for c in args.config], args.overrides)
        # whatever the run reads must be mounted read-only, what it writes writable, on every pod
        reads = [cfg.model.path, cfg.rollout.prompts_file, cfg.run.eval_prompts_file,
                 *(r.model_path for r in cfg.reward.rewards)]
        for pod in pod_specs(job["spec"]["rayClusterSpec"]):
            for path in filter(None, reads):
                assert under_mount(path, pod, writable=False), f"{path} is not mounted in every pod"
            assert under_mount(cfg.run.output_dir, pod, writable=True), "run.output_dir must be a writable mount"
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] and all(isinstance(v, str) for v in env["env_vars"].values())


# ---------------------------------------------------------------- Serve


@pytest.mark.parametrize("label, serve_config", [pytest.param(*s, id=s[0]) for s in serve_configs()])
def test_serve_configs_validate_and_build(label, serve_config):
    from ray.serve.schema import ServeDeploySchema  # Serve's own schema for `serve deploy` / serveConfigV2

    ServeDeploySchema.model_validate(serve_config)
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder), f"{label}: {app['import_path']} is not callable"
        for spec in app["args"].get("rewards", []):
            RewardSpec.model_validate(spec)
        builder(app["args"])  # builds the Application graph (validates all args) without a cluster


def test_rayservice_workers_mount_the_reward_models_and_get_the_token():
    token_env = RewardServerConfig().auth_token_env
    for svc in kuberay_objects("RayService"):
        cluster = svc["spec"]["rayClusterConfig"]
        (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        specs = [RewardSpec.model_validate(s) for s in app["args"]["rewards"]]
        for group in cluster["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            for s in specs:
                assert s.model_path is None or under_mount(s.model_path, pod, writable=False), s.model_path
        for pod in pod_specs(cluster):
            assert all(token_env in {e["name"] for e in c.get("env", [])} for c in pod["containers"])
        # a replica given a GPU scores on it (the scorers' device "auto"); an explicit "cpu" there would waste it
        assert all(s.options.get("device", "auto") in ("auto", "cuda") for s in specs if s.num_gpus > 0)


# ---------------------------------------------------------------- ray job submit / ray up


def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert (REPO / env["working_dir"]).resolve() == REPO, "working_dir is the repo root (ray job submit runs there)"
    assert "runs/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"


def test_cluster_launcher():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    launcher = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # the schema `ray up` validates against
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] > 0 for t in workers), "no GPU worker type"
    assert f":{RAY_VERSION}-" in launcher["docker"]["image"], "node image must carry the pinned ray version"
    project_dirs = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert project_dirs, "file_mounts must copy the repo to the nodes"
    assert any(f"pip install -e {d}" in cmd for d in project_dirs for cmd in launcher["setup_commands"])
