"""The learned shapes reward model: a small image-text scorer for 32×32 shapes-world images.

It plays the part a real reward model (PickScore, HPSv2) plays for a large policy: a network that
approximates a preference signal, served by Ray Serve, and imperfect. Here the signal is the rule
verifier's partial-credit score (`services.shapes_world.verify`), which stays the held-out gold metric.

    model = ShapesRewardModel()                       # ~0.25 M parameters
    reward = model.score(images, prompts)             # (B, 32, 32, 3) uint8, B prompts -> (B,) in [0, 1]
    save(model, "reward_servers/assets/shapes_reward"); model = load("reward_servers/assets/shapes_reward")
    metrics = train_reward_model("out_dir", steps=3000, batch_size=128, seed=0)

Architecture: prompt words (from `shapes_world.VOCABULARY`) + learned positions -> 2-layer transformer
-> mean-pooled text vector t (D). Image + (y, x) coordinate channels -> 4 conv layers (32×32 -> 8×8),
each after the stem modulated by FiLM(t) (Perez et al., 2018), -> mean and max pooled -> MLP([img, t])
-> logit; score = sigmoid(logit). FiLM lets the text choose which colours/shapes the convs look for; the
coordinate channels give the later layers absolute positions for the relation prompts.

Training (`train_reward_model`): regression (BCE on soft targets) onto the verifier score of renders of
train-split prompts, of corrupted renders (`shapes_world.corrupt`: recolour, remove, move, reshape,
add), of mismatched prompt/image pairs, of blank images and of degraded images (blur, noise, dimming,
labelled after degradation so the target is what the verifier says of what the model sees), plus mild
Gaussian pixel noise on every batch. Run: `python -m reward_servers.scorers.shapes_reward_model --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from services import shapes_world as sw

CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "model.safetensors", "metrics.json"
PAD = "<pad>"
KINDS = ("render", "corrupt", "mismatch", "degraded", "blank")
KIND_PROBS = (0.25, 0.4, 0.15, 0.17, 0.03)


class ShapesRewardModel(nn.Module):
    """(B, 3, 32, 32) pixels in [0, 1] + (B, L) word ids -> (B,) logits of the verifier score."""

    def __init__(self, vocab: Sequence[str] = sw.VOCABULARY, max_words: int = 10, dim: int = 64,
                 channels: Sequence[int] = (32, 64, 64, 64)) -> None:
        super().__init__()
        self.config = {"vocab": list(vocab), "max_words": max_words, "dim": dim, "channels": list(channels)}
        self.word_index = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding
        self.embed = nn.Embedding(len(vocab) + 1, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_words, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        c = list(channels)
        self.stem = nn.Conv2d(5, c[0], 4, stride=2, padding=1)  # RGB + y, x coordinates; 32 -> 16 px
        strides = [2, 1, 1][: len(c) - 1]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=s, padding=1) for a, b, s in zip(c, c[1:], strides))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in c[1:])
        self.film = nn.Linear(dim, 2 * sum(c[1:]))  # per conv layer: (gamma, beta)
        self.head = nn.Sequential(nn.Linear(2 * c[-1] + dim, 128), nn.ReLU(), nn.Linear(128, 1))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> (B, max_words) int64 word ids; ValueError for unknown words or long prompts."""
        ids = torch.zeros(len(prompts), self.config["max_words"], dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = prompt.lower().strip().rstrip(".").split()
            if not words or len(words) > self.config["max_words"]:
                raise ValueError(f"prompt {prompt!r} must have 1..{self.config['max_words']} words")
            unknown = [w for w in words if w not in self.word_index]
            if unknown:
                raise ValueError(f"prompt {prompt!r} has words outside the model vocabulary: {unknown}")
            ids[b, : len(words)] = torch.tensor([self.word_index[w] for w in words])
        return ids

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) word ids -> (B, D) mean of the transformer outputs over the non-padding words."""
        keep = tokens != 0  # (B, L)
        h = self.text(self.embed(tokens) + self.pos[: tokens.shape[1]], src_key_padding_mask=~keep)
        return (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1], tokens (B, L) -> (B,) logits."""
        t = self.encode_text(tokens)  # (B, D)
        b, _, h, w = pixels.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.relu(self.stem(torch.cat([pixels * 2 - 1, ys, xs], dim=1)))  # (B, C0, H, W)
        films = self.film(t).split([2 * conv.out_channels for conv in self.convs], dim=-1)
        for conv, norm, film in zip(self.convs, self.norms, films):
            gamma, beta = film[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            x = torch.relu(norm(conv(x)) * (1 + gamma) + beta)  # (B, C, H', W')
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3)), t], dim=-1)  # (B, 2C + D)
        return self.head(pooled)[:, 0]

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """images (B, 32, 32, 3) uint8, B prompts -> (B,) float32 reward in [0, 1]."""
        pixels = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0  # copies: Ray hands read-only arrays
        return torch.sigmoid(self(pixels, self.tokenize(prompts))).numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ save / load


def save(model: ShapesRewardModel, path: str | Path, metrics: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ metrics.json) into directory `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"architecture": "ShapesRewardModel", **model.config}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    (path / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; the checkpoint ships in the package
    if metrics is not None:
        (path / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return path


def load(path: str | Path) -> ShapesRewardModel:
    """Read a model written by `save`, in eval mode. FileNotFoundError / ValueError name the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"shapes reward model: {path / name} is missing (train one with "
                                    f"`python -m reward_servers.scorers.shapes_reward_model --out {path}`)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        if config.pop("architecture", None) != "ShapesRewardModel":
            raise ValueError("'architecture' is not 'ShapesRewardModel'")
        model = ShapesRewardModel(**config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"shapes reward model: {path / CONFIG_FILE} is corrupted or not ours: {e}") from e
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(f"shapes reward model: {path / WEIGHTS_FILE} is corrupted or does not match "
                         f"{CONFIG_FILE}: {e}") from e
    return model.eval()


# ------------------------------------------------------------------------------------------------ data


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, dim and noise an image, like an under-trained policy's output: (32, 32, 3) uint8 -> same."""
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(rng.uniform(0.3, 1.2),) * 2 + (0,))
    x = x * rng.uniform(0.6, 1.0) + rng.normal(0.0, rng.uniform(0.0, 20.0), size=x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def make_example(prompt: str, kind: str, rng: np.random.Generator, split: str) -> np.ndarray:
    """An image for `prompt` of one KINDS kind: (32, 32, 3) uint8 (label it with `verify`)."""
    if kind == "blank":
        return np.zeros((sw.IMAGE_SIZE, sw.IMAGE_SIZE, 3), dtype=np.uint8)
    if kind == "mismatch":
        return sw.render(sw.sample_prompts(1, rng, split=split)[0], rng)
    image = sw.render(prompt, rng)
    if kind in ("corrupt", "degraded") and (kind == "corrupt" or rng.random() < 0.5):
        kinds = [k for k in sw.CORRUPTIONS if k != "move" or sw.parse(prompt).relation]
        image = sw.corrupt(prompt, image, rng, kinds[rng.integers(len(kinds))])
    return _degrade(image, rng) if kind == "degraded" else image


def make_dataset(n: int, rng: np.random.Generator, split: str = "train") -> dict[str, object]:
    """n labelled examples: images (n, 32, 32, 3) uint8, prompts [n], targets (n,) float32, kinds [n]."""
    prompts = sw.sample_prompts(n, rng, split=split)
    kinds = [KINDS[k] for k in rng.choice(len(KINDS), size=n, p=KIND_PROBS)]
    images = np.stack([make_example(p, k, rng, split) for p, k in zip(prompts, kinds)])
    targets = np.array([sw.verify(p, im).score for p, im in zip(prompts, images)], dtype=np.float32)
    return {"images": images, "prompts": prompts, "targets": targets, "kinds": kinds}


def merge_datasets(parts: Sequence[dict]) -> dict[str, object]:
    """Concatenate labelled datasets (images, prompts, targets, kinds), in order; targets as float32."""
    if not parts:
        raise ValueError("no sample sets to merge")
    return {"images": np.concatenate([d["images"] for d in parts]),
            "prompts": [p for d in parts for p in d["prompts"]],
            "targets": np.concatenate([np.asarray(d["targets"], np.float32) for d in parts]),
            "kinds": [k for d in parts for k in d.get("kinds", ["extra"] * len(d["prompts"]))]}


def evaluate(model: ShapesRewardModel, data: dict, batch_size: int = 512) -> dict[str, float]:
    """Spearman ρ (all, renders+corruptions only) and mean absolute error vs the verifier targets."""
    model.eval()
    preds = np.concatenate([model.score(data["images"][i:i + batch_size], data["prompts"][i:i + batch_size])
                            for i in range(0, len(data["prompts"]), batch_size)])
    targets, kinds = data["targets"], np.array(data["kinds"])
    rc = np.isin(kinds, ("render", "corrupt"))
    return {"spearman": float(stats.spearmanr(preds, targets).statistic),
            "spearman_render_corrupt": float(stats.spearmanr(preds[rc], targets[rc]).statistic) if rc.sum() > 2 else None,
            "mae": float(np.abs(preds - targets).mean()), "n": int(len(targets))}


# -------------------------------------------------------------------------------------------- training


def _batches(data: dict, batch_size: int, rng: np.random.Generator, noise_std: float):
    """Endless shuffled batches: (pixels (B, 3, 32, 32) noised, tokens prompts list, targets (B,))."""
    n = len(data["prompts"])
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            pixels = torch.from_numpy(data["images"][idx]).permute(0, 3, 1, 2).float() / 255.0
            sigma = torch.rand(batch_size, 1, 1, 1) * noise_std  # mild noise, label unchanged
            pixels = (pixels + sigma * torch.randn_like(pixels)).clamp(0, 1)
            yield pixels, [data["prompts"][i] for i in idx], torch.from_numpy(data["targets"][idx])


def train_reward_model(
    out_dir: str | Path | None, *, steps: int = 3000, batch_size: int = 128, seed: int = 0,
    num_samples: int = 20000, eval_samples: int = 2000, lr: float = 2e-3, noise_std: float = 0.03,
    log_every: int = 100, num_threads: int | None = None, log: Callable[[str], None] = print,
    extra: dict | None = None, extra_eval: dict | None = None, extra_repeat: int = 3,
) -> dict[str, object]:
    """Train a ShapesRewardModel on the train split, evaluate on fresh train and held-out prompts, save.

    Returns metrics: {"train": evaluate(...), "heldout": evaluate(...), "loss": final loss, "seconds", ...}.
    `out_dir` None skips saving (tests).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    data = make_dataset(num_samples, rng, "train")
    log(f"built {num_samples} training examples in {time.perf_counter() - t0:.1f}s "
        f"(mean target {data['targets'].mean():.3f})")
    if extra is not None:  # e.g. policy samples labelled by the verifier: the images RL will ask about
        data = merge_datasets([data] + [extra] * extra_repeat)
        log(f"added {len(extra['prompts'])} extra examples ×{extra_repeat} (mean target {extra['targets'].mean():.3f})")
    model = ShapesRewardModel()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batches = _batches(data, batch_size, rng, noise_std)
    ema = None
    for step in range(1, steps + 1):
        pixels, prompts, targets = next(batches)
        model.train()
        loss = nn.functional.binary_cross_entropy_with_logits(model(pixels, model.tokenize(prompts)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            log(f"step {step}/{steps} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.perf_counter() - t0:.0f}s")
    eval_rng = np.random.default_rng(seed + 10_000)
    metrics = {"train": evaluate(model, make_dataset(eval_samples, eval_rng, "train")),
               "heldout": evaluate(model, make_dataset(eval_samples, eval_rng, "heldout")),
               **({"extra_eval": evaluate(model, extra_eval)} if extra_eval is not None else {}),
               "loss": ema, "steps": steps, "batch_size": batch_size, "seed": seed, "num_samples": num_samples,
               "params": sum(p.numel() for p in model.parameters()), "num_threads": torch.get_num_threads(),
               "seconds": round(time.perf_counter() - t0, 1)}
    log(f"held-out Spearman {metrics['heldout']['spearman']:.3f} "
        f"(renders+corruptions {metrics['heldout']['spearman_render_corrupt']:.3f}), "
        f"train-split Spearman {metrics['train']['spearman']:.3f}")
    if out_dir is not None:
        save(model, out_dir, metrics)
        log(f"saved to {out_dir}")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="Train the learned shapes reward model on CPU.")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return train_reward_model(a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed,
                              num_samples=a.num_samples, num_threads=a.threads)


if __name__ == "__main__":
    main()
