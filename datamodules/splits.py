"""Train/val/test splits by a hash of each sample's identity: stable as samples are added,
independent of their order and of the seed, and computable one sample at a time (streams)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import TypeVar

from datamodules.errors import EmptySplitError

log = logging.getLogger(__name__)

T = TypeVar("T")
SPLITS = ("train", "val", "test")


def position(identity: str | bytes) -> float:
    """Where an identity (a path, an image's bytes) hashes to in [0, 1)."""
    data = identity.encode() if isinstance(identity, str) else identity
    return int(hashlib.sha1(data).hexdigest()[:8], 16) / 16**8


def bands(val_fraction: float, test_fraction: float) -> dict[str, tuple[float, float]]:
    """Each split's interval of `position`: test first, then val, train the rest."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need val_fraction, test_fraction >= 0 with sum < 1, got {val_fraction}, {test_fraction}")
    val_end = test_fraction + val_fraction
    return {"test": (0.0, test_fraction), "val": (test_fraction, val_end), "train": (val_end, 1.0)}


def split_records(
    records: Sequence[T],
    val_fraction: float,
    test_fraction: float,
    identity: Callable[[T], str | bytes] = attrgetter("key"),
) -> dict[str, list[T]]:
    """Assign each record to train/val/test by the `position` of its identity.

    A split with a positive share (train always) gets at least one record: in a small set
    the hash can leave one empty, and then the record nearest its band moves over from the
    largest split. Too few records for that is an `EmptySplitError`.
    """
    limits = bands(val_fraction, test_fraction)
    where = {id(r): position(identity(r)) for r in records}
    splits = {name: [r for r in records if low <= where[id(r)] < high] for name, (low, high) in limits.items()}
    wanted = [name for name, (low, high) in limits.items() if high > low]
    if len(records) < len(wanted):
        raise EmptySplitError(
            f"{len(records)} sample(s) cannot fill the {', '.join(wanted)} splits "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction}): add samples"
        )
    for name in wanted:
        if not splits[name]:
            low, high = limits[name]
            donor = max(splits.values(), key=len)
            nearest = min(donor, key=lambda r: max(low - where[id(r)], where[id(r)] - high))
            donor.remove(nearest)
            splits[name].append(nearest)
            log.info("the %s split was empty; it takes %s", name, getattr(nearest, "key", nearest))
    return {name: splits[name] for name in SPLITS}
