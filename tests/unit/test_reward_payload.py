"""The reward service's request decoding (base64 PNG and raw arrays) and the replica's batch merging, without Ray."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from reward_servers.payload import (
    ArrayPayload,
    PayloadError,
    ScoreRequest,
    decode_array,
    decode_images,
    decode_request,
    encode_array,
    encode_png,
)
from reward_servers.worker import ScorerWorker
from services.config import RewardSpec

# ------------------------------------------------------------------------------------ request payloads


def _b64png(image: np.ndarray | Image.Image, fmt: str = "PNG") -> str:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_png_and_array_payloads_roundtrip(shapes_batch):
    images, prompts = shapes_batch
    assert np.array_equal(decode_images([encode_png(im) for im in images], 2048), images)
    assert np.array_equal(decode_array(ArrayPayload(**encode_array(images)), 2048, 512), images)
    floats = ArrayPayload(dtype="float32", shape=list(images.shape),
                          data=base64.b64encode((images / 255.0).astype(np.float32).tobytes()).decode())
    assert np.array_equal(decode_array(floats, 2048, 512), images)
    got, got_prompts = decode_request(ScoreRequest(prompts=prompts, array=encode_array(images)),
                                      max_side=2048, max_images=512)
    assert np.array_equal(got, images) and got_prompts == prompts


@pytest.mark.parametrize("item, match", [
    ("not base64!!", "not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), r"not an image file \(send PNG, JPEG or WebP\)$"),
    (_b64png(Image.new("L", (32, 32))), "mode L .1 channels"),
    (_b64png(Image.new("RGBA", (32, 32))), "mode RGBA .4 channels"),
    (_b64png(Image.new("RGB", (32, 32)), "GIF"), "GIF file"),
    (_b64png(np.zeros((40, 3000, 3), np.uint8)), r"40x3000 pixels.*\[1, 2048\]"),
    (_b64png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))[:400], "not a readable image"),
])
def test_bad_image_files_are_422(item, match):
    with pytest.raises(PayloadError, match=match) as e:
        decode_images([item], 2048)  # one file, as the request path decodes it
    assert e.value.status == 422 and "images[0]" in str(e.value)


def test_mixed_image_sizes_are_refused():
    items = [_b64png(np.zeros((32, 32, 3), np.uint8)), _b64png(np.zeros((16, 16, 3), np.uint8))]
    with pytest.raises(PayloadError, match="same size"):
        decode_images(items, 2048)


def test_images_whose_pixels_would_pass_the_limit_are_413_before_any_is_decoded(monkeypatch):
    from reward_servers import payload

    big = _b64png(np.zeros((1024, 1024, 3), np.uint8))  # 3 MiB of pixels in a few kB of PNG
    assert len(big) < 20_000
    monkeypatch.setattr(payload, "_pixels", lambda raw, what: pytest.fail("decoded pixels of a refused request"))
    with pytest.raises(PayloadError, match=r"^9 images of 1024x1024 pixels decode to 27 MiB; at most 24 MiB") as e:
        decode_images([big] * 9, 2048, max_decoded_bytes=24 * 2**20)
    assert e.value.status == 413
    with pytest.raises(PayloadError, match="same size"):  # mixed sizes: refused from the headers too
        decode_images([big, _b64png(np.zeros((32, 32, 3), np.uint8))], 2048, max_decoded_bytes=24 * 2**20)
    monkeypatch.undo()
    assert decode_images([big] * 8, 2048, max_decoded_bytes=24 * 2**20).shape == (8, 1024, 1024, 3)  # 24 MiB: at it


def _array(arr: np.ndarray, **override) -> ArrayPayload:
    return ArrayPayload(**{**encode_array(arr), **override})


@pytest.mark.parametrize("payload, match", [
    (_array(np.zeros((1, 8, 8, 4), np.uint8)), "4 channels"),
    (_array(np.zeros((0, 8, 8, 3), np.uint8)), "empty batch"),
    (_array(np.zeros((3, 8, 8, 3), np.uint8)), "at most 2"),
    (_array(np.zeros((1, 8, 4096, 3), np.uint8)), r"8x4096 pixels"),
    (_array(np.zeros((1, 8, 8, 3), np.uint8), data="@@@"), "not valid base64"),
    (_array(np.zeros((1, 8, 8, 3), np.uint8), shape=[1, 8, 9, 3]), "needs 216"),
    (_array(np.full((1, 8, 8, 3), np.nan, np.float32)), "NaN or inf"),
    (_array(np.full((1, 8, 8, 3), np.inf, np.float32)), "NaN or inf"),
    (_array(np.full((1, 8, 8, 3), 2.0, np.float32)), r"values in \[0, 1\]"),
])
def test_bad_arrays_are_refused(payload, match):
    with pytest.raises(PayloadError, match=match):
        decode_array(payload, 2048, max_images=2)


@pytest.mark.parametrize("body, match", [
    ({"prompts": ["a"], "array": encode_array(np.zeros((2, 8, 8, 3), np.uint8))}, "1 prompts for 2 images"),
    ({"prompts": [], "images": []}, "empty batch"),
    ({"prompts": ["a"] * 3, "images": ["x"] * 3}, "at most 2"),
])
def test_bad_requests_are_refused(body, match):
    with pytest.raises(PayloadError, match=match):
        decode_request(ScoreRequest(**body), max_side=2048, max_images=2)


@pytest.mark.parametrize("body", [
    {"prompts": ["a"]},                                                        # neither images nor array
    {"prompts": ["a"], "images": ["x"], "array": encode_array(np.zeros((1, 8, 8, 3), np.uint8))},
    {"prompts": ["a"], "images": ["x"], "pickle": "gASV"},                     # unknown field
    {"prompts": "a", "images": ["x"]},                                         # wrong type
    {"prompts": ["a"], "array": {**encode_array(np.zeros((1, 8, 8, 3), np.uint8)), "dtype": "float64"}},
])
def test_request_schema_rejects_malformed_bodies(body):
    with pytest.raises(ValidationError):
        ScoreRequest(**body)


# ------------------------------------------------------------------------------------- batch merging


def test_worker_merges_requests_and_isolates_bad_ones(shapes_batch):
    images, prompts = shapes_batch
    worker = ScorerWorker(RewardSpec(name="shapes_verifier"))
    reqs = [(images[:2], prompts[:2]), (images[2:3], ["a red blob"]), (images[2:], prompts[2:]),
            (np.zeros((1, 16, 16, 3), np.uint8), prompts[:1])]
    res = worker.score_many(reqs)
    assert res[0]["scores"].tolist() == [1.0, 1.0] and res[2]["scores"].tolist() == [1.0, 1.0]
    assert res[1]["scores"] is None and "outside the shapes grammar" in res[1]["error"]
    assert "32x32" in res[3]["error"]
    assert all(r["batch_size"] == 4 for r in res) and worker.info()["max_observed_batch_size"] == 4
    jpeg = ScorerWorker(RewardSpec(name="jpeg_incompressibility"))
    small, big = np.zeros((2, 16, 16, 3), np.uint8), np.full((1, 48, 48, 3), 7, np.uint8)
    merged = jpeg.score_many([(small, ["", ""]), (big, [""])])  # two image sizes: two model calls
    assert np.allclose(merged[1]["scores"], jpeg.scorer.score(big, [""])) and merged[0]["batch_images"] == 2


def test_worker_health_fails_after_repeated_crashes():
    class Broken:
        name = "broken"

        def score(self, images, prompts):
            raise RuntimeError("CUDA error: device-side assert")

        def info(self):
            return {"architecture": "broken"}

    worker = ScorerWorker(RewardSpec(name="shapes_verifier"), scorer=Broken())
    worker.check_health()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="CUDA"):
            worker.score_many([(np.zeros((1, 32, 32, 3), np.uint8), ["a red circle"])])
    with pytest.raises(RuntimeError, match="3 model calls in a row failed"):
        worker.check_health()
