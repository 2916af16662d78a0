"""Reward scorers without Ray (the request decoding and batch merging: test_reward_payload.py).

Each scorer is checked against an independent computation: the verifier against `verify` itself, JPEG
sizes against PIL directly, CLIP scores against CLIPModel.forward's `logits_per_image` (a different code
path from the scorer's get_image_features/get_text_features), the aesthetic head against a hand-written
MLP over the state dict. CLIP models are tiny, built from a config with a locally written tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reward_servers.scorers import SCORERS, ScorerLoadError, build_scorer, check_batch
from reward_servers.scorers import shapes_reward_model as srm
from reward_servers.scorers.aesthetic import AestheticHead
from reward_servers.scorers.jpeg import jpeg_size_kb
from services import shapes_world as sw


@pytest.fixture(scope="module")
def corrupted(shapes_batch) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(1)
    images, prompts = shapes_batch
    out = [sw.corrupt(p, im, rng, kind) for p, im in zip(prompts, images) for kind in ("recolor", "remove", "add")]
    return np.stack(out), [p for p in prompts for _ in range(3)]


# ------------------------------------------------------------------------------ registry and checks


def test_registry_lists_every_scorer_and_unknown_names_fail_clearly():
    assert set(SCORERS) == {"shapes_verifier", "shapes_reward", "jpeg_compressibility", "jpeg_incompressibility",
                            "clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward"}
    with pytest.raises(ValueError, match="unknown reward scorer 'nope'.*pickscore.*shapes_reward"):
        build_scorer("nope")
    with pytest.raises(TypeError, match="scorer 'jpeg_compressibility': bad option"):
        build_scorer("jpeg_compressibility", colour="red")


@pytest.mark.parametrize("images, prompts, match", [
    (np.zeros((1, 32, 32, 3), np.float32), ["a"], "dtype uint8"),
    (np.zeros((32, 32, 3), np.uint8), ["a"], r"\(B, H, W, 3\)"),
    (np.zeros((1, 32, 32, 4), np.uint8), ["a"], "3 RGB channels"),
    (np.zeros((0, 32, 32, 3), np.uint8), [], "empty batch"),
    (np.zeros((1, 16, 16, 3), np.uint8), ["a"], "must be 32x32"),
    (np.zeros((2, 32, 32, 3), np.uint8), ["a"], "1 prompts for 2 images"),
    (np.zeros((1, 32, 32, 3), np.uint8), "a", "list of strings"),
    (np.zeros((1, 32, 32, 3), np.uint8), [3], "prompt 0 is int"),
    ([[0]], ["a"], "numpy array"),
])
def test_check_batch_names_the_problem(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        check_batch(images, prompts, size=(32, 32))


# ------------------------------------------------------------------------------------- shapes scorers


def test_shapes_verifier_matches_verify_on_renders_and_corruptions(shapes_batch, corrupted):
    scorer = build_scorer("shapes_verifier")
    images, prompts = shapes_batch
    assert scorer.score(images, prompts).tolist() == [1.0] * len(prompts)
    assert build_scorer("shapes_verifier", strict=True).score(images, prompts).tolist() == [1.0] * len(prompts)
    bad_images, bad_prompts = corrupted
    scores = scorer.score(bad_images, bad_prompts)
    expected = [sw.verify(p, im).score for p, im in zip(bad_prompts, bad_images)]
    assert scores.dtype == np.float32 and np.allclose(scores, expected)
    assert (scores < 1.0).all()


def test_local_rewards_build_each_scorer_with_its_options(corrupted):
    """The in-process path (sample_efficiency, diagnose, the screens) scores what a Serve replica would: the spec's
    options reach the scorer (they were once dropped there, and a `strict` screen ran the partial verifier)."""
    from reward_servers.client import LocalRewards
    from services.config.sections import RewardSpec

    images, prompts = corrupted
    strict = LocalRewards.from_specs([RewardSpec(name="shapes_verifier", options={"strict": True})])
    partial = LocalRewards.from_specs([RewardSpec(name="shapes_verifier")])
    got = strict.submit("shapes_verifier", images, prompts).result()
    expected = [float(sw.verify(p, im).strict) for p, im in zip(prompts, images)]
    assert got.tolist() == expected == [0.0] * len(prompts)  # every corruption fails the strict pass …
    assert (partial.submit("shapes_verifier", images, prompts).result() > 0).any()  # … not the partial score
    with pytest.raises(TypeError, match="shapes_verifier"):
        LocalRewards.from_specs([RewardSpec(name="shapes_verifier", options={"strictness": 1})])


def test_verifier_extras_weight_worked_example():
    """points / (max points + w × extras): a red circle asked as "a red square" has 1 point of 3 and one extra."""
    rng = np.random.default_rng(0)
    circle = sw.render("a red circle", rng)[None]
    two = sw.render("a red circle and a blue triangle", rng)[None]  # one named object, one extra for "a red circle"
    for w, square, one_of_two in [(1.0, 1 / 4, 3 / 4), (3.0, 1 / 6, 3 / 6), (0.0, 1 / 3, 1.0)]:
        scorer = build_scorer("shapes_verifier", extras_weight=w)
        assert scorer.score(circle, ["a red square"])[0] == pytest.approx(square)
        assert scorer.score(two, ["a red circle"])[0] == pytest.approx(one_of_two)
    assert build_scorer("shapes_verifier").score(two, ["a red circle"])[0] == sw.verify("a red circle", two[0]).score
    with pytest.raises(ValueError, match="extras_weight"):
        build_scorer("shapes_verifier", extras_weight=-1)
    with pytest.raises(ValueError, match="strict"):
        build_scorer("shapes_verifier", strict=True, extras_weight=3)


def test_shapes_scorers_refuse_bad_prompts_and_sizes(shapes_batch):
    images, prompts = shapes_batch
    for name in ("shapes_verifier", "shapes_reward"):
        scorer = build_scorer(name)
        with pytest.raises(ValueError, match="outside the shapes grammar"):
            scorer.score(images[:1], ["a red blob"])
        with pytest.raises(ValueError, match="32x32"):
            scorer.score(np.zeros((1, 64, 64, 3), np.uint8), prompts[:1])
    with pytest.raises(ValueError, match="rule-based"):
        build_scorer("shapes_verifier", model_path="/x")


def test_shapes_reward_checkpoint_ranks_renders_above_corruptions(shapes_batch, corrupted):
    scorer = build_scorer("shapes_reward")  # the checkpoint shipped in reward_servers/assets/shapes_reward
    images, prompts = shapes_batch
    good = scorer.score(images, prompts)
    bad = scorer.score(*corrupted)
    assert good.dtype == np.float32 and good.shape == (4,) and ((good >= 0) & (good <= 1)).all()
    assert np.array_equal(good, scorer.score(images, prompts))  # deterministic
    assert np.allclose(good, srm.load(scorer.path).score(images, prompts))
    # Paired: each render scores above most of its own corruptions (recolour, remove, add). The shipped
    # checkpoint also learned base-policy samples, which costs some render/corruption margin (mean gap
    # 0.19 on this batch, 0.20+ for a renders-only model) — see reward_servers/assets/shapes_reward/README.md.
    wins = (good[:, None] > bad.reshape(len(good), 3)).mean()
    assert wins >= 0.75 and good.mean() > bad.mean() + 0.15


def test_shapes_reward_model_roundtrip_and_load_errors(tmp_path, shapes_batch):
    torch.manual_seed(0)
    model = srm.ShapesRewardModel().eval()
    srm.save(model, tmp_path / "m")
    images, prompts = shapes_batch
    assert np.allclose(model.score(images, prompts), srm.load(tmp_path / "m").score(images, prompts))
    with pytest.raises(ScorerLoadError, match=r"nowhere.config.json is missing.*python -m reward_servers.scorers.shapes_reward_model"):
        build_scorer("shapes_reward", model_path=str(tmp_path / "nowhere"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ScorerLoadError, match="model.safetensors is corrupted"):
        build_scorer("shapes_reward", model_path=str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ScorerLoadError, match="config.json is corrupted"):
        build_scorer("shapes_reward", model_path=str(tmp_path / "m"))


def test_train_reward_model_smoke(tmp_path):
    logs: list[str] = []
    extra = {**srm.make_dataset(8, np.random.default_rng(3)), "kinds": ["policy"] * 8}  # like policy samples
    metrics = srm.train_reward_model(tmp_path, steps=2, batch_size=8, num_samples=16, eval_samples=24,
                                     log_every=1, log=logs.append, extra=extra, extra_eval=extra)
    assert {"train", "heldout", "loss", "extra_eval"} <= set(metrics) and -1 <= metrics["heldout"]["spearman"] <= 1
    assert metrics["extra_eval"]["n"] == 8 and metrics["extra_eval"]["spearman_render_corrupt"] is None
    assert (tmp_path / "model.safetensors").is_file() and json.loads((tmp_path / "metrics.json").read_text())
    assert any(line.startswith("step 2/2") for line in logs)


# ----------------------------------------------------------------------------------------------- jpeg


def test_jpeg_scorers_match_pil():
    rng = np.random.default_rng(0)
    images = np.stack([np.zeros((32, 32, 3), np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)])
    sizes = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        sizes.append(len(buf.getvalue()) / 1000)
    inc = build_scorer("jpeg_incompressibility").score(images, ["", ""])
    comp = build_scorer("jpeg_compressibility").score(images, ["", ""])
    assert np.allclose(inc, sizes) and np.allclose(comp, -np.array(sizes)) and inc[1] > inc[0]
    assert jpeg_size_kb(images[1]) == pytest.approx(sizes[1])
    with pytest.raises(ValueError, match="weight-free"):
        build_scorer("jpeg_compressibility", model_path="/x")


# ------------------------------------------------------------------------------ CLIP-based, tiny models


def _tiny_clip(path) -> str:
    """A random tiny CLIPModel + CLIPProcessor saved to `path` (tokenizer vocab written here, no hub)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return _tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def clip_inputs() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8), ["a red circle", "a dog", "blue"]


def _reference_logits(path: str, images: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, float]:
    """Diagonal of CLIPModel.forward's logits_per_image and exp(logit_scale), computed independently."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    inputs = AutoProcessor.from_pretrained(path, local_files_only=True)(
        text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal(), float(model.logit_scale.exp())


def test_clip_score_is_100_times_cosine(tiny_clip, clip_inputs):
    logits, scale = _reference_logits(tiny_clip, *clip_inputs)
    scores = build_scorer("clip_score", model_path=tiny_clip).score(*clip_inputs)
    assert scores.dtype == np.float32 and np.allclose(scores, 100 * logits.numpy() / scale, atol=1e-4)
    raw = build_scorer("clip_score", model_path=tiny_clip, scale="logit_scale").score(*clip_inputs)
    assert np.allclose(raw, logits.numpy(), atol=1e-4)


def test_pickscore_is_clip_logits_with_optional_normalisation(tiny_clip, clip_inputs):
    logits, _ = _reference_logits(tiny_clip, *clip_inputs)
    assert np.allclose(build_scorer("pickscore", model_path=tiny_clip).score(*clip_inputs), logits, atol=1e-4)
    norm = build_scorer("pickscore", model_path=tiny_clip, normalize=True).score(*clip_inputs)
    assert np.allclose(norm, (logits.numpy() - 18) / 8, atol=1e-4)


def test_aesthetic_is_mlp_on_normalised_image_embedding(tiny_clip, clip_inputs, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoProcessor, CLIPModel

    torch.manual_seed(1)
    state = AestheticHead(input_dim=16).state_dict()
    save_file(state, str(tmp_path / "head.safetensors"))
    torch.save(state, tmp_path / "head.pth")
    images, prompts = clip_inputs
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    pixels = AutoProcessor.from_pretrained(tiny_clip, local_files_only=True)(images=list(images), return_tensors="pt")
    with torch.no_grad():
        emb = model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        x = model.visual_projection(emb)
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # the LAION layer indices; dropout is identity in eval
            x = torch.nn.functional.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    for head in ("head.safetensors", "head.pth"):
        scorer = build_scorer("aesthetic", model_path=tiny_clip, head_path=str(tmp_path / head))
        assert np.allclose(scorer.score(images, prompts), x[:, 0].numpy(), atol=1e-5)
    with pytest.raises(ScorerLoadError, match="head weights not found"):
        build_scorer("aesthetic", model_path=tiny_clip)
    save_file(AestheticHead(input_dim=768).state_dict(), str(tmp_path / "big.safetensors"))
    with pytest.raises(ScorerLoadError, match="embedding size 16"):
        build_scorer("aesthetic", model_path=tiny_clip, head_path=str(tmp_path / "big.safetensors"))


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_clip_scorers_need_a_local_model(name, tmp_path):
    with pytest.raises(ScorerLoadError, match="needs model_path"):
        build_scorer(name)
    with pytest.raises(ScorerLoadError, match="does not exist.*never downloaded"):
        build_scorer(name, model_path=str(tmp_path / "missing"))
    with pytest.raises(ScorerLoadError, match="no config.json"):
        build_scorer(name, model_path=str(tmp_path))


@pytest.mark.parametrize("name, module, weights, extra", [
    ("hpsv2", "hpsv2", "HPS_v2.1_compressed.pt", r"mixgrpo-ray\[hpsv2\]"),
    ("imagereward", "ImageReward", "ImageReward.pt", r"mixgrpo-ray\[imagereward\]"),
])
def test_optional_scorers_name_the_extra_and_the_path(name, module, weights, extra, tmp_path, monkeypatch):
    with pytest.raises(ScorerLoadError, match=f"{weights}.*not found|not found.*{weights}|{weights}"):
        build_scorer(name, model_path=str(tmp_path))
    for f in (weights, "med_config.json"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # make the package missing even where it is installed
    with pytest.raises(ScorerLoadError, match=f"{extra}.*{tmp_path}"):
        build_scorer(name, model_path=str(tmp_path))


def test_a_local_serve_proxy_gets_time_to_start_unless_the_user_chose(monkeypatch):
    """Serve's default (3 readiness checks of 5 s) killed the HTTP proxy on a busy two-core machine; the local Ray
    the driver or `python -m reward_servers` starts inherits 30 s, and an operator's own value is kept."""
    from reward_servers.app import patient_proxy_start

    key = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    monkeypatch.delenv(key, raising=False)
    patient_proxy_start()
    assert os.environ[key] == "30"
    monkeypatch.setenv(key, "7")
    patient_proxy_start()
    assert os.environ[key] == "7"
