"""Read TensorBoard event files without TensorBoard: TFRecord framing + tensorboardX's protobufs.

tensorboardX is installed with Ray, so the tests that check event files need no extra package. A record
is: uint64 length, uint32 CRC of the length, `length` bytes of an `Event` protobuf, uint32 CRC of the data.
"""

from __future__ import annotations

import io
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2


def iter_events(logdir: str | Path):
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            yield event


def read_events(logdir: str | Path) -> tuple[dict, dict, dict]:
    """(scalars {tag: [(step, value)]}, images {tag: [(step, (H, W, 3) uint8)]}, texts {tag: [(step, str)]})."""
    scalars, images, texts = defaultdict(list), defaultdict(list), defaultdict(list)
    for event in iter_events(logdir):
        for v in event.summary.value:
            if v.HasField("image"):
                with Image.open(io.BytesIO(v.image.encoded_image_string)) as im:
                    images[v.tag].append((event.step, np.asarray(im.convert("RGB"))))
            elif v.HasField("tensor") and v.tensor.string_val:
                # both writers store text under "<tag>/text_summary"
                texts[v.tag.removesuffix("/text_summary")].append((event.step, v.tensor.string_val[0].decode()))
            elif v.WhichOneof("value") == "simple_value":
                scalars[v.tag].append((event.step, v.simple_value))
            elif v.HasField("tensor") and v.tensor.float_val:
                scalars[v.tag].append((event.step, v.tensor.float_val[0]))
    return dict(scalars), dict(images), dict(texts)
