import os

import numpy as np
import pytest

from datamodules.annotators import DepthAnnotator
from datamodules.cache import AnnotationCache


class CountingEstimator:
    """A stand-in depth estimator that records how often it runs."""

    def __init__(self, gain: float = 1.0):
        self.gain, self.calls = gain, 0

    @property
    def cache_params(self) -> dict:
        return {"estimator": "counting", "gain": self.gain}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (image.mean(axis=2) / 255 * self.gain).astype(np.float32)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"pretend image bytes")
    return path


def test_hit_returns_the_stored_array_without_recomputing(tmp_path, image_file):
    cache, calls = AnnotationCache(tmp_path / "cache"), []
    compute = lambda: calls.append(1) or np.arange(6, dtype=np.float32).reshape(2, 3)  # noqa: E731
    first = cache.get_or_compute(image_file, {"p": 1}, compute)
    second = cache.get_or_compute(image_file, {"p": 1}, compute)
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)


def test_changed_parameters_or_file_miss(tmp_path, image_file):
    cache = AnnotationCache(tmp_path / "cache")
    key = cache.key(image_file, {"p": 1})
    assert cache.key(image_file, {"p": 2}) != key
    assert cache.key(image_file, {"p": 1}) == key
    stat = image_file.stat()
    os.utime(image_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(image_file, {"p": 1}) != key
    image_file.write_bytes(b"other bytes, other size")
    assert cache.key(image_file, {"p": 1}) != key


def test_entries_are_plain_npy_files_loadable_without_pickle(tmp_path, image_file):
    cache = AnnotationCache(tmp_path / "cache")
    cache.get_or_compute(image_file, {}, lambda: np.ones((3, 3), np.float32))
    entries = list((tmp_path / "cache").rglob("*"))
    files = [e for e in entries if e.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npy" and "partial" not in files[0].name
    assert np.load(files[0], allow_pickle=False).shape == (3, 3)


def test_estimating_annotator_caches_per_file_and_parameters(tmp_path, image_file, photo):
    image = photo(32, 48)
    sample = {"image": image, "key": "photo.jpg", "path": image_file}
    estimator = CountingEstimator()
    annotator = DepthAnnotator(estimator=estimator, cache_dir=tmp_path / "cache")
    first = annotator.prepare(dict(sample))["depth"]
    second = annotator.prepare(dict(sample))["depth"]
    assert estimator.calls == 1
    np.testing.assert_array_equal(first, second)
    # A new annotator over the same directory (a new run) still hits.
    rerun = CountingEstimator()
    DepthAnnotator(estimator=rerun, cache_dir=tmp_path / "cache").prepare(dict(sample))
    assert rerun.calls == 0
    # A changed estimator parameter recomputes.
    changed = CountingEstimator(gain=0.5)
    result = DepthAnnotator(estimator=changed, cache_dir=tmp_path / "cache").prepare(dict(sample))["depth"]
    assert changed.calls == 1
    np.testing.assert_allclose(result, first * 0.5, atol=1e-6)


def test_samples_without_a_file_are_estimated_every_time(tmp_path, photo):
    estimator = CountingEstimator()
    annotator = DepthAnnotator(estimator=estimator, cache_dir=tmp_path / "cache")
    for _ in range(2):
        annotator.prepare({"image": photo(16, 16), "key": "shapesworld/train/0"})
    assert estimator.calls == 2 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["empty", "cut short", "pickled"])
def test_an_unreadable_entry_is_computed_again_and_replaced(tmp_path, image_file, caplog, damage):
    cache = AnnotationCache(tmp_path / "cache")
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    cache.get_or_compute(image_file, {"p": 1}, lambda: expected)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    if damage == "pickled":
        np.save(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        entry.write_bytes(b"" if damage == "empty" else entry.read_bytes()[:-8])
    with caplog.at_level("WARNING"):
        again = cache.get_or_compute(image_file, {"p": 1}, lambda: expected)
    np.testing.assert_array_equal(again, expected)
    assert f"annotation cache entry {entry} is unreadable" in caplog.text
    np.testing.assert_array_equal(np.load(entry, allow_pickle=False), expected)  # replaced
