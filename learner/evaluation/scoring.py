"""Scoring evaluation images, written once: per-image columns, per-category means, macro-averaged overall.

Columns: `verifier_score` and `verifier_strict` (the shapes rule verifier, for shapes-world images) and
one per reward scorer (any function (images (B, H, W, 3) uint8, prompts) → (B,) scores: a local scorer
or the run's Serve deployments). Shapes-world prompts are grouped by category; other prompts form one
group, "all". The overall value of a column is the mean of its category means, so an unbalanced prompt
list does not tilt it towards its biggest category.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from services import shapes_world

ScoreFn = Callable[[np.ndarray, list[str]], np.ndarray]
VERIFIER_COLUMNS = ("verifier_score", "verifier_strict")


def score_images(prompts: Sequence[str], images: np.ndarray, *, verifier: bool,
                 rewards: Mapping[str, ScoreFn] | None = None, batch_size: int = 64) -> dict:
    """Score one image per prompt: `image_scores`, then `summarize`."""
    prompts = list(prompts)
    return summarize(prompts, image_scores(prompts, images, verifier=verifier, rewards=rewards,
                                           batch_size=batch_size), verifier=verifier)


def image_scores(prompts: Sequence[str], images: np.ndarray, *, verifier: bool,
                 rewards: Mapping[str, ScoreFn] | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-image columns {name: (P,) float64}: the verifier's two (for shapes-world images), then each reward's."""
    prompts = list(prompts)
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"need one image per prompt and at least one, got {len(prompts)} / {len(images)}")
    if not verifier and not rewards:
        raise ValueError("nothing to score with: no verifier and no rewards")
    scores: dict[str, np.ndarray] = {}
    if verifier:
        verdicts = [shapes_world.verify(p, im) for p, im in zip(prompts, images)]
        scores["verifier_score"] = np.array([v.score for v in verdicts], np.float64)
        scores["verifier_strict"] = np.array([float(v.strict) for v in verdicts], np.float64)
    for name, fn in (rewards or {}).items():
        parts = [np.asarray(fn(images[lo:lo + batch_size], prompts[lo:lo + batch_size]), np.float64)
                 for lo in range(0, len(prompts), batch_size)]
        scores[name] = np.concatenate(parts)
        if scores[name].shape != (len(prompts),) or not np.isfinite(scores[name]).all():
            raise ValueError(f"reward {name!r} returned {scores[name].shape} scores (all finite: "
                             f"{bool(np.isfinite(scores[name]).all())}) for {len(prompts)} images")
    return scores


def macro_stderr(values: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Standard error of the mean of group means: sqrt(Σ_c s_c² / n_c) / C, s_c the sample sd of group c (a group
    of one image adds nothing: its spread is unknown)."""
    terms = [values[idx].var(ddof=1) / len(idx) for idx in groups if len(idx) > 1]
    return float(np.sqrt(sum(terms)) / len(groups)) if groups else float("nan")


def summarize(prompts: Sequence[str], scores: Mapping[str, Sequence[float]], *, verifier: bool) -> dict:
    """Per-image columns (`image_scores`, possibly merged from shards) → the evaluation's numbers.

    -> {"num_prompts", "columns": [names], "overall": {column: macro mean}, "stderr": {column: its standard
        error}, "per_category": {category: {"n", column: mean}}, "prompts": [...], "scores": {column: [per image]}}
    """
    prompts = list(prompts)
    scores = {k: np.asarray(v, np.float64) for k, v in scores.items()}
    if any(v.shape != (len(prompts),) for v in scores.values()):
        raise ValueError(f"{len(prompts)} prompts but score columns of shapes {[v.shape for v in scores.values()]}")
    cats = [shapes_world.category(p) for p in prompts] if verifier else ["all"] * len(prompts)
    groups = {cat: [i for i, c in enumerate(cats) if c == cat]
              for cat in dict.fromkeys(c for c in (*shapes_world.CATEGORIES, *cats) if c in cats)}
    per_category = {cat: {"n": len(idx), **{k: float(v[idx].mean()) for k, v in scores.items()}}
                    for cat, idx in groups.items()}
    overall = {k: float(np.mean([m[k] for m in per_category.values()])) for k in scores}
    stderr = {k: macro_stderr(v, list(groups.values())) for k, v in scores.items()}
    return {"num_prompts": len(prompts), "columns": list(scores), "overall": overall, "stderr": stderr,
            "per_category": per_category, "prompts": prompts, "scores": {k: v.tolist() for k, v in scores.items()}}


REQUIREMENTS = ("colour", "shape", "count", "relation", "extras", "objects")
_NONE, _SEVERAL = len(shapes_world.SHAPES), len(shapes_world.SHAPES) + 1  # shape_confusion's columns past the shapes


def image_requirements(prompts: Sequence[str], images: np.ndarray) -> list[list[int]]:
    """Per image, what the verifier counted (`shapes_world.requirements`), as JSON-able rows [required objects,
    colour present, shape present, exact count, relation (1 holds, 0 not, -1 none required), extras, found,
    required shape, drawn shape]. The last two are for single-object prompts (else -1): the index in SHAPES of the
    shape asked for and of the one object drawn in the asked colour (len(SHAPES): none, + 1: several)."""
    rows = []
    for p, im in zip(prompts, images, strict=True):
        found, spec = shapes_world.detect(im), shapes_world.parse(p)
        r = shapes_world.requirements(p, im, found)
        asked = drawn = -1
        if spec.category == "single":
            colour, shape, _ = spec.objects[0]
            mine = [d.shape for d in found if d.color == colour]
            asked = shapes_world.SHAPES.index(shape)
            drawn = shapes_world.SHAPES.index(mine[0]) if len(mine) == 1 else _NONE if not mine else _SEVERAL
        rows.append([r.objects, r.colour, r.shape, r.count, -1 if r.relation is None else int(r.relation),
                     r.extras, r.found, asked, drawn])
    return rows


def requirement_rates(prompts: Sequence[str], rows: Sequence[Sequence[int]]) -> dict[str, dict[str, float]]:
    """`image_requirements` rows → per category (and "all"): the fraction of required objects whose colour, shape
    and exact count were right, the fraction of relation prompts whose relation held (only where the category has
    any), and the mean extras and detected objects per image. Where a category's score is lost, in short."""
    rows = np.asarray(rows, np.float64).reshape(len(prompts), 9)
    cats = [shapes_world.category(p) for p in prompts]
    out = {}
    for cat in [*(c for c in shapes_world.CATEGORIES if c in cats), "all"]:
        r = rows[[i for i, c in enumerate(cats) if cat in (c, "all")]]
        m = {"n": int(len(r)), **{k: float(r[:, j].sum() / r[:, 0].sum()) for k, j in
                                  (("colour", 1), ("shape", 2), ("count", 3))}}
        if (r[:, 4] >= 0).any():
            m["relation"] = float(r[r[:, 4] >= 0, 4].mean())
        out[cat] = m | {"extras": float(r[:, 5].mean()), "objects": float(r[:, 6].mean())}
    return out


def shape_confusion(rows: Sequence[Sequence[int]]) -> dict[str, dict[str, int]]:
    """`image_requirements` rows → for the single-object prompts, {shape asked: {shape drawn in the asked colour, or
    "none" / "several": images}}: whether the model can draw each shape as the verifier reads it."""
    names = [*shapes_world.SHAPES, "none", "several"]
    out = {s: dict.fromkeys(names, 0) for s in shapes_world.SHAPES}
    for row in rows:
        if row[7] >= 0:
            out[names[row[7]]][names[row[8]]] += 1
    return out


HEADROOM = (("as drawn", ()), ("every colour", ("colour",)), ("every relation", ("relation",)),
            ("colour + relation", ("colour", "relation")), ("no extras", ("extras",)),
            ("colour + relation + no extras", ("colour", "relation", "extras")), ("every shape", ("shape",)),
            ("every count", ("count",)), ("shape + count", ("shape", "count")))
"""`headroom`'s rows: a name and the requirements granted in it."""


def headroom(prompts: Sequence[str], rows: Sequence[Sequence[int]]) -> dict[str, float]:
    """`image_requirements` rows → the macro-averaged verifier score with the named requirements' points granted and
    everything else as drawn (`HEADROOM`): "every colour" gives each required object its colour point, "every
    relation" each relation prompt its point, "no extras" drops the extras from the denominator; "as drawn" is the
    evaluation's own verifier_score. A per-requirement counterfactual: the knock-on effects are not followed
    (a colour fixed would often fix the count and remove an extra too; a relation needs the right shapes), so a
    row is neither an upper nor a lower bound, only a measure of where the points are lost. Scored by the verifier's
    own rule (`shapes_world.Requirements.verdict`) and macro-averaged as `summarize` does."""
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} requirement rows")
    drawn = [shapes_world.Requirements(o, c, s, n, None if rel < 0 else bool(rel), e, f)
             for o, c, s, n, rel, e, f, *_ in rows]
    scores = {name: [_granted(r, granted).verdict.score for r in drawn] for name, granted in HEADROOM}
    return summarize(prompts, scores, verifier=True)["overall"]


def _granted(r: shapes_world.Requirements, granted: Sequence[str]) -> shapes_world.Requirements:
    """`r` with the points of `granted` given: colour / shape / count for every required object, the relation where
    the prompt has one, no extras."""
    change = {k: r.objects for k in ("colour", "shape", "count") if k in granted}
    if "relation" in granted and r.relation is not None:
        change["relation"] = True
    if "extras" in granted:
        change["extras"] = 0
    return dataclasses.replace(r, **change)


def requirements_table(results: Mapping[str, Mapping]) -> str:
    """{label: result with "requirements"} → one Markdown table, a row per (label, category); and where the result
    has "shape_confusion", a second table of it, and where it has "headroom", a third."""
    lines = ["| set | category | n | " + " | ".join(REQUIREMENTS) + " |", "|---|---|---|" + "---|" * len(REQUIREMENTS)]
    for label, r in results.items():
        for cat, m in r["requirements"].items():
            cells = " | ".join(f"{m[k]:.3f}" if k in m else "–" for k in REQUIREMENTS)
            lines.append(f"| {label} | {'**all**' if cat == 'all' else cat} | {m['n']} | {cells} |")
    confusions = {label: r["shape_confusion"] for label, r in results.items() if "shape_confusion" in r}
    if confusions:
        names = [*shapes_world.SHAPES, "none", "several"]
        lines += ["", "| set | single prompt asks for | " + " | ".join(f"drawn: {n}" for n in names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for label, conf in confusions.items():
            lines += [f"| {label} | {asked} | " + " | ".join(str(row[n]) for n in names) + " |"
                      for asked, row in conf.items()]
    rooms = {label: r["headroom"] for label, r in results.items() if "headroom" in r}
    if rooms:
        lines += ["", "| verifier_score with these points granted: set | " + " | ".join(n for n, _ in HEADROOM) + " |",
                  "|---|" + "---:|" * len(HEADROOM)]
        lines += [f"| {label} | " + " | ".join(f"{room[n]:.3f}" for n, _ in HEADROOM) + " |"
                  for label, room in rooms.items()]
    return "\n".join(lines)


def headline(result: Mapping) -> str:
    """The column a result is judged by: the verifier score when there is one, else the first reward."""
    return "verifier_score" if "verifier_score" in result["columns"] else result["columns"][0]


def eval_record(iteration: int, result: Mapping) -> dict:
    """The `kind: eval` record of metrics.jsonl: `eval_<column>` overall with its standard error `eval_<column>_se`,
    and per shapes category `eval_<category>_score` (the verifier score); `eval_columns` lists the overall
    columns."""
    rec = {"kind": "eval", "iteration": iteration, "eval_num_prompts": result["num_prompts"],
           "eval_columns": list(result["columns"]), **{f"eval_{k}": v for k, v in result["overall"].items()},
           **{f"eval_{k}_se": v for k, v in result.get("stderr", {}).items()}}
    if "verifier_score" in result["columns"]:
        rec |= {f"eval_{c}_score": m["verifier_score"] for c, m in result["per_category"].items()}
    return rec


def markdown_table(results: Mapping[str, Mapping]) -> str:
    """{label: score_images result} → one Markdown table: a row per (label, category) and the overall rows."""
    columns = list(dict.fromkeys(c for r in results.values() for c in r["columns"]))
    lines = ["| set | category | n | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]

    def cells(m: Mapping, bold: bool = False) -> str:
        fmt = "**{:.3f}**" if bold else "{:.3f}"
        return " | ".join(fmt.format(m[c]) if c in m else "–" for c in columns)

    for label, r in results.items():
        for cat, m in r["per_category"].items():
            lines.append(f"| {label} | {cat} | {m['n']} | {cells(m)} |")
        lines.append(f"| {label} | **overall** | {r['num_prompts']} | {cells(r['overall'], True)} |")
    return "\n".join(lines)
