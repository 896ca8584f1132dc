"""On-disk cache of expensive annotations (estimator outputs), one ``.npy`` per entry.

An entry's key hashes the source file's identity (resolved path, size, modification time),
or for an image held in a dataset row its encoded bytes, and the annotator's parameters, so editing the file or changing a parameter misses, while
rerunning the same configuration hits. Entries are written atomically (temporary file,
then rename), so dataloader workers may share a directory, and read with
``allow_pickle=False``: a cache directory never executes code. An entry that cannot be read
(empty, cut short, pickled) is computed again and replaced, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from conftrl.utils.atomic import atomic_write

log = logging.getLogger(__name__)


class AnnotationCache:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def key(self, source: str | os.PathLike | bytes, params: Mapping) -> str:
        """`source` is an image file, or an image's encoded bytes (a dataset row's), keyed by their hash."""
        if isinstance(source, bytes):
            identity = {"sha256": hashlib.sha256(source).hexdigest(), "params": params}
        else:
            stat = os.stat(source)
            identity = {
                "path": str(Path(source).resolve()),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "params": params,
            }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def get_or_compute(
        self, source: str | os.PathLike | bytes, params: Mapping, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        key = self.key(source, params)
        entry = self.directory / key[:2] / f"{key}.npy"
        if entry.exists():
            try:
                array = np.load(entry, allow_pickle=False)
                self.hits += 1
                return array
            except (OSError, ValueError, EOFError) as err:  # empty, cut short, pickled: recompute
                log.warning("annotation cache entry %s is unreadable (%s); computing it again", entry, err)
        self.misses += 1
        array = np.asarray(compute())
        atomic_write(entry, lambda file: np.save(file, array, allow_pickle=False))
        return array
