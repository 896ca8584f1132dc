"""The runs W&B wrote offline, read back from their `.wandb` files."""

from __future__ import annotations

import struct
from pathlib import Path


def wandb_records(directory: Path) -> dict[str, list]:
    """The protobuf records of each offline W&B run under `directory`, by run folder name.

    An offline run is a `.wandb` file: a 7-byte header, then `Record`s in LevelDB-log framing
    (32 KiB blocks; chunks with a 7-byte header: crc, length, type FULL/FIRST/MIDDLE/LAST).
    The framing is read here because the wandb package ships no Python reader for it (its Go
    core reads these files for `wandb sync` and has no command that prints them); the records
    are wandb's own protobufs.
    """
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted(directory.glob("**/offline-run-*/run-*.wandb")):
        data, position, pending, records = path.read_bytes(), 7, b"", []
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # FULL or LAST: a record is complete
                records.append(wandb_internal_pb2.Record.FromString(pending))
                pending = b""
        runs[path.parent.name] = records
    return runs


def wandb_runs(directory: Path) -> list:
    """The run record (id, group, job type, ...) of each offline W&B run under `directory`."""
    return [
        next(r.run for r in records if r.WhichOneof("record_type") == "run")
        for records in wandb_records(directory).values()
    ]
