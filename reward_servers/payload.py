"""Wire format of the reward REST API: pydantic schemas and the decoding of images from JSON.

Two ways to send a batch of B images with B prompts (JSON only; nothing is ever unpickled):

    {"prompts": [...], "images": ["<base64 PNG>", ...]}                       # portable, lossless
    {"prompts": [...], "array": {"dtype": "uint8", "shape": [B, H, W, 3],    # fast: raw C-order bytes
                                 "data": "<base64>"}}

`array.dtype` may also be "float32" with values in [0, 1] (converted with round(255·x)); NaN, inf or
values outside [0, 1] are refused. Every decoding problem raises `PayloadError(status, message)`, which
the HTTP layer turns into a JSON 4xx naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

ARRAY_DTYPES = {"uint8": np.uint8, "float32": np.float32}


class PayloadError(ValueError):
    """A request that cannot be scored: `status` is the HTTP code (413, 422), the message names why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ArrayPayload(BaseModel):
    """A dense image batch: `shape` = [B, H, W, 3], `data` = base64 of the C-order bytes."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["uint8", "float32"] = "uint8"
    shape: list[StrictInt] = Field(min_length=4, max_length=4)  # strict: `true` is not the number 1
    data: str


class ScoreRequest(BaseModel):
    """POST /v1/rewards/{name}/score body: prompts plus exactly one of `images` or `array`."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str]
    images: list[str] | None = None
    """Base64-encoded PNG (or JPEG/WebP) files, RGB, all the same size."""
    array: ArrayPayload | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ScoreRequest:
        if (self.images is None) == (self.array is None):
            raise ValueError("send exactly one of 'images' (base64 PNG list) or 'array' (raw uint8 array)")
        return self


class ScoreResponse(BaseModel):
    """Scores in request order, plus what the server did with the request."""

    reward: str
    scores: list[float]
    num_images: int
    model: str
    latency_ms: float
    batch_size: int
    """Requests merged into the model call that scored this one (dynamic batching)."""
    batch_images: int
    """Images in that model call."""
    replica: str


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: str
    """Short machine-readable code, e.g. invalid_base64, bad_image_size, unknown_reward."""
    detail: str
    """Human-readable explanation naming the problem."""


def encode_array(images: np.ndarray) -> dict[str, object]:
    """(B, H, W, 3) uint8 -> the JSON `array` object (used by the client)."""
    images = np.ascontiguousarray(images)
    return {"dtype": str(images.dtype), "shape": list(images.shape),
            "data": base64.b64encode(images.tobytes()).decode("ascii")}


def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG string."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(422, f"{what} is not valid base64 ({e})") from None


def _check_dims(h: int, w: int, max_side: int, what: str) -> None:
    if not (1 <= h <= max_side and 1 <= w <= max_side):
        raise PayloadError(422, f"{what} is {h}x{w} pixels; height and width must be in [1, {max_side}]")


def _image_file(text: str, what: str, max_side: int) -> tuple[bytes, int, int]:
    """A base64 image file -> (its bytes, height, width), read from its header: no pixel is decoded. 422 for bad
    base64, non-images, formats other than PNG/JPEG/WebP, non-RGB modes and oversize."""
    raw = _b64(text, what)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            _check_dims(img.height, img.width, max_side, what)  # before decoding pixels: no bombs
            if img.format not in ("PNG", "JPEG", "WEBP"):
                raise PayloadError(422, f"{what} is a {img.format} file; send PNG (or JPEG/WebP)")
            if img.mode != "RGB":
                raise PayloadError(422, f"{what} has mode {img.mode} ({len(img.getbands())} channels); "
                                        "images must be RGB with 3 channels")
            return raw, img.height, img.width
    except UnidentifiedImageError:
        raise PayloadError(422, f"{what} is not an image file (send PNG, JPEG or WebP)") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise PayloadError(422, f"{what} is not a readable image file ({type(e).__name__}: {e})") from None


def _pixels(raw: bytes, what: str) -> np.ndarray:
    """A checked image file's bytes -> (H, W, 3) uint8."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, Image.DecompressionBombError) as e:  # a header that reads and a body that does not
        raise PayloadError(422, f"{what} is not a readable image file ({type(e).__name__}: {e})") from None


def decode_images(items: list[str], max_side: int, max_decoded_bytes: int | None = None) -> np.ndarray:
    """Base64 image files (all the same size) -> (B, H, W, 3) uint8. Every header is read first: mixed sizes and a
    request whose pixels would take more than `max_decoded_bytes` (413) are refused before any pixel is decoded,
    so a few MB of compressed images cannot make the server allocate gigabytes."""
    files = [_image_file(t, f"images[{i}]", max_side) for i, t in enumerate(items)]
    sizes = sorted({(h, w, 3) for _, h, w in files})
    if len(sizes) > 1:
        raise PayloadError(422, f"all images in a request must have the same size, got {sizes}")
    h, w, _ = sizes[0]
    decoded = len(files) * h * w * 3
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise PayloadError(413, f"{len(files)} images of {h}x{w} pixels decode to {decoded / 2**20:.0f} MiB; at most "
                                f"{max_decoded_bytes / 2**20:.0f} MiB per request (reward.server.max_decoded_bytes): "
                                "send fewer or smaller images")
    return np.stack([_pixels(raw, f"images[{i}]") for i, (raw, _, _) in enumerate(files)])


def decode_array(payload: ArrayPayload, max_side: int, max_images: int) -> np.ndarray:
    """The `array` object -> (B, H, W, 3) uint8. 413/422 for bad shape, byte count, NaN/inf or range."""
    b, h, w, c = payload.shape
    if c != 3:
        raise PayloadError(422, f"array has {c} channels (shape {payload.shape}); images must be [B, H, W, 3] RGB")
    if b < 1:
        raise PayloadError(422, f"empty batch: array shape {payload.shape} has no images")
    if b > max_images:
        raise PayloadError(413, f"{b} images in one request; at most {max_images} are allowed")
    _check_dims(h, w, max_side, "array")
    dtype = np.dtype(ARRAY_DTYPES[payload.dtype])
    raw = _b64(payload.data, "array.data")
    expected = math.prod(payload.shape) * dtype.itemsize
    if len(raw) != expected:
        raise PayloadError(422, f"array.data holds {len(raw)} bytes but shape {payload.shape} of "
                                f"{payload.dtype} needs {expected}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(payload.shape)
    if dtype == np.uint8:
        return arr.copy()
    if not np.isfinite(arr).all():
        raise PayloadError(422, "array contains NaN or inf values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise PayloadError(422, f"float32 arrays must hold values in [0, 1], got [{arr.min()}, {arr.max()}]")
    return np.round(arr * 255.0).astype(np.uint8)


def decode_request(req: ScoreRequest, *, max_side: int, max_images: int, max_decoded_bytes: int | None = None,
                   ) -> tuple[np.ndarray, list[str]]:
    """Validated request -> (images (B, H, W, 3) uint8, B prompts). Raises PayloadError."""
    n = len(req.images) if req.images is not None else req.array.shape[0]
    if n == 0 or not req.prompts:
        raise PayloadError(422, f"empty batch: got {len(req.prompts)} prompts and {n} images; send at least one")
    if n > max_images:
        raise PayloadError(413, f"{n} images in one request; at most {max_images} are allowed")
    if len(req.prompts) != n:
        raise PayloadError(422, f"got {len(req.prompts)} prompts for {n} images; counts must match")
    if req.images is not None:
        images = decode_images(req.images, max_side, max_decoded_bytes)
    else:
        images = decode_array(req.array, max_side, max_images)
    return images, list(req.prompts)
