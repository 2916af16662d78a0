"""Loading a configuration: defaults ← preset / YAML files (deep-merged) ← dotted overrides, validated.

Method presets live in `deploy/configs/<name>.yaml`; `preset_path("mixgrpo_flash")` finds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .checks import Config
from .sections import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "deploy" / "configs"


def preset_path(name: str) -> Path:
    """Path of a config preset in deploy/configs/ by name (`mixgrpo_flash`) or an explicit path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json"):
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return p


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`window.size=6` → ("window.size", 6); values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part.isidentifier() and not part.isdigit() for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: expected section.field=value, e.g. window.size=6")
    try:
        return key, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({e})") from e


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" + (f" (got {e['input']!r})" if e["type"] == "extra_forbidden" else ""))
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(data: dict) -> Config:
    """Validate a nested dict into a Config, turning pydantic errors into a ConfigError naming fields."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None


# Fields that nothing read and were removed: (section, field) → what to do instead. A run directory's config.json
# written before the removal holds them at their default (None) and still loads; any other value is refused.
RETIRED = {("run", "resume"): "resume a run with `python learner/main.py --resume DIR`"}


def _drop_retired(data: dict, source: str | Path) -> dict:
    for (section, name), instead in RETIRED.items():
        fields = data.get(section)
        if isinstance(fields, dict) and name in fields:
            if fields[name] is not None:
                raise ConfigError(f"{source}: {section}.{name} is no longer a config field; {instead}")
            data = {**data, section: {k: v for k, v in fields.items() if k != name}}
    return data


def load_config(files: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults ← each YAML file in order (deep-merged) ← dotted overrides; then validate."""
    data: dict = Config().model_dump(mode="json")  # start from defaults so overrides can index lists
    methods: dict[str, str] = {}  # run.method -> the file that set it
    for f in files:
        layer = _drop_retired(_read_yaml(preset_path(str(f))), f)
        method = (layer.get("run") or {}).get("method") if isinstance(layer.get("run"), dict) else None
        if method is not None:
            methods.setdefault(method, str(f))
        if len(methods) > 1:  # a preset sets only the fields it needs, so the earlier one's others would stay
            raise ConfigError(f"--config: two method presets ({', '.join(f'{m} from {src}' for m, src in methods.items())}); "
                              "a preset does not reset another's fields (the run would mix the two methods): give one "
                              "method preset and override its fields")
        data = _deep_merge(data, layer)
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_dotted(data, key, value)
        except (IndexError, ValueError) as e:
            raise ConfigError(f"override {text!r}: {e}") from e
    return build_config(data)


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as JSON (what a run really used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    return path
