"""The package layout the README's architecture section promises, checked from the source:

- `learner/algo` imports only torch and the standard library; any role may import it.
- `rollout_workers/`, `services/` and `reward_servers/` import nothing else from `learner/`; services imports no
  role, and the two roles outside learner/ do not import each other.
- one module applies `ray.remote` (learner/driver/actors.py) and one `serve.deployment`
  (reward_servers/deployments.py); actor methods are written out, never dispatched by name.
- the command-line tools, the evaluation, the outputs and the builders import no Ray.
- no module over 400 lines; no module named like its package; nothing in learner/ shadows an installed
  module (`python learner/main.py` puts learner/ first on sys.path).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("learner", "rollout_workers", "services", "reward_servers")


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(ROOT).parent.parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module)
    return out


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_algo_imports_only_torch_and_the_standard_library():
    bad = {rel(p): sorted(m for m in imports(p) if m.split(".")[0] not in sys.stdlib_module_names
                          and m.split(".")[0] != "torch" and not m.startswith("learner.algo"))
           for p in py_files("learner/algo")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("package, forbidden", [
    ("services", ("rollout_workers", "reward_servers", "learner")),
    ("rollout_workers", ("reward_servers", "learner")),
    ("reward_servers", ("rollout_workers", "learner")),
])
def test_roles_import_only_in_the_allowed_direction(package, forbidden):
    bad = {}
    for p in py_files(package):
        wrong = [m for m in imports(p) if m.split(".")[0] in forbidden and not m.startswith("learner.algo")]
        if wrong:
            bad[rel(p)] = wrong
    assert not bad, f"{package}/ may import services/ and learner/algo only (README, Architecture): {bad}"


def test_one_module_applies_ray_remote_and_one_serve_deployment():
    remote = [rel(p) for p in py_files(*PACKAGES) if "@ray.remote" in p.read_text() or "ray.remote(" in p.read_text()]
    deploy = [rel(p) for p in py_files(*PACKAGES) if "@serve.deployment" in p.read_text()]
    assert remote == ["learner/driver/actors.py"] and deploy == ["reward_servers/deployments.py"]
    actors = (ROOT / "learner/driver/actors.py").read_text()
    assert "getattr(" not in actors and "def call(" not in actors  # every actor method is written out


def test_tools_evaluation_outputs_and_builders_import_no_ray():
    modules = ["learner.tools.pretrain", "learner.tools.eval", "learner.tools.export", "learner.tools.diagnose",
               "learner.tools.report", "learner.evaluation", "learner.outputs.observers", "learner.outputs.report",
               "learner.driver.build", "learner.driver.inprocess", "learner.training"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
           "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_over_400_lines():
    long = {rel(p): n for p in py_files(*PACKAGES, "tests", "benchmarks")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_no_module_shares_its_package_name_and_learner_shadows_nothing():
    same = [rel(p) for p in py_files(*PACKAGES) if p.stem == p.parent.name]
    assert not same
    # `python learner/main.py` puts learner/ on sys.path: its entries must not hide installed modules
    entries = {p.stem for p in (ROOT / "learner").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    path = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "learner")]
    shadowed = sorted(n for n in entries if n in sys.stdlib_module_names or PathFinder.find_spec(n, path) is not None)
    assert not shadowed


def test_the_driver_runs_its_own_checkouts_packages(tmp_path):
    """`python <checkout>/learner/main.py` imports that checkout's packages, as its actors do (ray_session puts the
    same root on their PYTHONPATH), even where another checkout's `pip install -e` or PYTHONPATH comes first."""
    other = tmp_path / "other_checkout" / "services"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise SystemExit('imported another checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(other.parent)}
    done = subprocess.run([sys.executable, str(ROOT / "learner" / "main.py"), "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "another checkout" not in done.stderr and "embedded default" in done.stdout


def test_a_job_from_rays_unpacked_working_dir_writes_where_ray_does_not_delete():
    from learner.main import default_runs_root

    assert default_runs_root(ROOT) == ROOT / "runs"
    unpacked = Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd")
    assert default_runs_root(unpacked) == Path.home() / "mixgrpo-runs"
