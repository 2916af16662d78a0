"""Reward scorers: plain classes behind the `Scorer` protocol, one file each, built by name.

    scorer = build_scorer("pickscore", model_path="/models/PickScore_v1", normalize=True)
    scorer.score(images, prompts)   # (B, H, W, 3) uint8, B prompts -> (B,) float32

| name                   | file                | weights                                     |
|------------------------|---------------------|---------------------------------------------|
| shapes_verifier        | shapes_verifier.py  | none (rule verifier)                        |
| shapes_reward          | shapes_reward.py    | reward_servers/assets/shapes_reward         |
| jpeg_compressibility   | jpeg.py             | none (PIL JPEG size, negated)               |
| jpeg_incompressibility | jpeg.py             | none (PIL JPEG size)                        |
| clip_score             | clip_score.py       | local CLIP dir                              |
| pickscore              | pickscore.py        | local PickScore_v1 dir (CLIP format)        |
| aesthetic              | aesthetic.py        | local CLIP ViT-L/14 dir + LAION MLP head    |
| hpsv2                  | hpsv2.py            | extra [hpsv2] + HPS_v2.1_compressed.pt      |
| imagereward            | imagereward.py      | extra [imagereward] + ImageReward.pt        |

Heavy imports (transformers, the optional packages) happen inside the constructors, so importing this
module is cheap and a missing extra only matters to the scorer that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from reward_servers.scorers.base import Scorer, ScorerLoadError, check_batch


def _shapes_verifier(**kw: Any) -> Scorer:
    from reward_servers.scorers.shapes_verifier import ShapesVerifier
    return ShapesVerifier(**kw)


def _shapes_reward(**kw: Any) -> Scorer:
    from reward_servers.scorers.shapes_reward import ShapesReward
    return ShapesReward(**kw)


def _jpeg_compressibility(**kw: Any) -> Scorer:
    from reward_servers.scorers.jpeg import jpeg_compressibility
    return jpeg_compressibility(**kw)


def _jpeg_incompressibility(**kw: Any) -> Scorer:
    from reward_servers.scorers.jpeg import jpeg_incompressibility
    return jpeg_incompressibility(**kw)


def _clip_score(**kw: Any) -> Scorer:
    from reward_servers.scorers.clip_score import ClipScore
    return ClipScore(**kw)


def _pickscore(**kw: Any) -> Scorer:
    from reward_servers.scorers.pickscore import PickScore
    return PickScore(**kw)


def _aesthetic(**kw: Any) -> Scorer:
    from reward_servers.scorers.aesthetic import Aesthetic
    return Aesthetic(**kw)


def _hpsv2(**kw: Any) -> Scorer:
    from reward_servers.scorers.hpsv2 import HPSv2
    return HPSv2(**kw)


def _imagereward(**kw: Any) -> Scorer:
    from reward_servers.scorers.imagereward import ImageReward
    return ImageReward(**kw)


SCORERS: dict[str, Callable[..., Scorer]] = {
    "shapes_verifier": _shapes_verifier,
    "shapes_reward": _shapes_reward,
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
    "clip_score": _clip_score,
    "pickscore": _pickscore,
    "aesthetic": _aesthetic,
    "hpsv2": _hpsv2,
    "imagereward": _imagereward,
}
"""name -> constructor(model_path=None, **options). Keys are the names used in RewardSpec.name."""


WEIGHT_FOLDER_SCORERS = frozenset({"clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward"})
"""Scorers that load their weights from a local folder, `model_path` (`base.require_dir`)."""


def check_reward_specs(specs: Sequence[Any], field: str = "reward.rewards") -> None:
    """Names unique and registered, before anything deploys: a ConfigError naming `<field>.<i>.name`."""
    from services.config import ConfigError

    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name not in SCORERS:
            raise ConfigError(f"{field}.{i}.name: unknown reward scorer {name!r}; known scorers: "
                              f"{', '.join(sorted(SCORERS))}")
        if names.index(name) != i:
            raise ConfigError(f"{field}.{i}.name: reward {name!r} is already {field}.{names.index(name)}; reward "
                              "names must be unique (one Serve deployment each)")


def reward_weight_problems(specs: Sequence[Any], field: str = "reward.rewards") -> tuple[list[str], list[str]]:
    """(unset, absent): weight-loading rewards with no `model_path`, and with one that is not a folder on this
    node (a cluster's reward nodes may still have it)."""
    unset, absent = [], []
    for i, s in enumerate(specs):
        if s.name not in WEIGHT_FOLDER_SCORERS:
            continue
        if not s.model_path:
            unset.append(f"{field}.{i}.model_path: {s.name} loads its weights from a local folder and none is set")
        elif not os.path.isdir(s.model_path):
            absent.append(f"{field}.{i}.model_path: {s.model_path!r} ({s.name}'s weights) is not a folder on this node")
    return unset, absent


def check_reward_weights(specs: Sequence[Any], *, local: bool, field: str = "reward.rewards") -> None:
    """Before the rewards deploy: a weight-loading reward with no `model_path` is refused; one whose folder is not on
    this node is refused on a local Ray and warned about on a cluster, whose reward nodes may have it (it failed only
    inside Serve's deploy). A ConfigError naming `<field>.<i>.model_path`."""
    import sys

    from services.config import ConfigError

    unset, absent = reward_weight_problems(specs, field)
    if unset or (absent and local):
        raise ConfigError("; ".join(unset + (absent if local else [])))
    for problem in absent:
        print(f"warning: {problem}; the reward's replicas fail to start unless their nodes have it.",
              file=sys.stderr, flush=True)


def build_scorer(name: str, model_path: str | None = None, **options: Any) -> Scorer:
    """Construct the scorer registered as `name`.

    Raises ValueError listing the known names for an unknown one, TypeError naming the scorer for an
    unknown option, ScorerLoadError for missing weights or packages.
    """
    if name not in SCORERS:
        raise ValueError(f"unknown reward scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
    try:
        return SCORERS[name](model_path=model_path, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise TypeError(f"scorer {name!r}: bad option ({e})") from e
        raise


__all__ = ["SCORERS", "WEIGHT_FOLDER_SCORERS", "Scorer", "ScorerLoadError", "build_scorer", "check_batch",
           "check_reward_specs", "check_reward_weights", "reward_weight_problems"]
