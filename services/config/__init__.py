"""The one validated run configuration.

Sections per role (model, sampler, window, grpo, reward, rollout, learner, cluster, run) in
`sections.py`; every model forbids unknown keys, documents its fields and checks ranges. `Config`
(`checks.py`) holds them all and checks the combinations; `loading.py` reads presets, YAML files and
dotted overrides. Defaults are the embedded job: the tiny model in the shapes world, MixGRPO, on a
two-core CPU.

    cfg = load_config(["deploy/configs/mixgrpo_flash.yaml"], ["window.size=6", "run.seed=1"])
    cfg.model_dump_json()       # the resolved config, written next to a run's outputs

Method presets live in `deploy/configs/<method>.yaml`; `preset_path("mixgrpo_flash")` finds them.
"""

from .checks import Config
from .loading import (
    PRESET_DIR,
    REPO_ROOT,
    build_config,
    dump_config,
    load_config,
    parse_override,
    preset_path,
)
from .sections import (
    METHODS,
    ClusterConfig,
    ConfigError,
    GrpoConfig,
    LearnerConfig,
    ModelConfig,
    RewardConfig,
    RewardServerConfig,
    RewardSpec,
    RolloutConfig,
    RunConfig,
    SamplerConfig,
    WindowConfig,
)

__all__ = [
    "METHODS", "PRESET_DIR", "REPO_ROOT", "ClusterConfig", "Config", "ConfigError", "GrpoConfig", "LearnerConfig",
    "ModelConfig", "RewardConfig", "RewardServerConfig", "RewardSpec", "RolloutConfig", "RunConfig", "SamplerConfig",
    "WindowConfig", "build_config", "dump_config", "load_config", "parse_override", "preset_path",
]
