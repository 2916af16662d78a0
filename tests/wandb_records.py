"""Read an offline wandb run's records without wandb's servers: the `.wandb` file is a LevelDB log of `Record`
protobufs (wandb/proto/wandb_internal.proto) after a 7-byte header (":W&B", a 2-byte magic, a version byte).

A LevelDB log is 32 KiB blocks of chunks: uint32 CRC, uint16 length, uint8 type (1 full, 2 first, 3 middle,
4 last), then `length` bytes; fewer than 7 bytes left in a block are padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER, CHUNK_HEADER = 32 * 1024, 7, 7


def iter_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, parts = HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the block's end
            continue
        parts.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (1, 4):  # full or last: a record is complete
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def read_history(run_dir: str | Path) -> list[dict]:
    """Every logged row of the (single) offline run under `run_dir`/wandb: {key: value, "_step": step}."""
    files = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline wandb run under {run_dir}, found {len(files)}")
    rows = []
    for record in iter_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
