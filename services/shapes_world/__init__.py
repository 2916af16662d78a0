"""The shapes world: a procedural text-to-image task with a ground-truth pixel verifier (GenEval-like).

Images are 32x32 RGB uint8 arrays `(H, W, 3)` on a black background with filled, upright shapes in pure
palette colours. Prompts come from a small grammar:

    single       "a red circle"
    counting     "two blue squares", "three green triangles"   ("one red circle" parses as count 1)
    two_objects  "a red circle and a blue square"               (two distinct (colour, shape) objects)
    position     "a red circle left of a blue square"           (relation of the FIRST to the SECOND)

`render` draws an image that satisfies a prompt, `verify` checks one from pixels only and returns a
partial-credit score and a strict pass, and `corrupt` breaks a rendered image in one named way (training
negatives for a learned reward model). A held-out split keeps some (colour, shape) pairs out of training.
"""

from .grammar import (
    ARTICLE,
    CATEGORIES,
    COLORS,
    CORRUPTIONS,
    COUNTS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    PLURALS,
    RELATIONS,
    SHAPES,
    SPLITS,
    VOCABULARY,
    Spec,
    all_prompts,
    category,
    format_spec,
    is_heldout,
    parse,
    sample_prompts,
)
from .pixels import (
    Detection,
    Requirements,
    Verdict,
    corrupt,
    detect,
    relation_holds,
    render,
    requirements,
    verify,
)

__all__ = [
    "ARTICLE", "CATEGORIES", "COLORS", "CORRUPTIONS", "COUNTS", "HELDOUT_PAIRS", "IMAGE_SIZE", "PALETTE", "PLURALS",
    "RELATIONS", "SHAPES", "SPLITS", "VOCABULARY", "Detection", "Requirements", "Spec", "Verdict", "all_prompts",
    "category", "corrupt", "detect", "format_spec", "is_heldout", "parse", "relation_holds", "render", "requirements", "sample_prompts",
    "verify",
]
