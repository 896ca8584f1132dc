"""Image folders a user already has, in three formats, indexed and checked at setup.

Formats (``format: auto`` picks the first that fits, in this order):

``imagefolder``  Hugging Face imagefolder: ``metadata.jsonl`` at the root, one JSON object
                 per line with ``file_name`` (image path relative to the root), ``text``
                 (caption) and optionally ``conditioning_image`` (control image path).
``controlnet``   ControlNet's tutorial format (Fill50K): ``prompt.json`` at the root, one
                 JSON object per line with ``target`` (image), ``source`` (control image)
                 and ``prompt`` (caption).
``txt``          Image files anywhere below the root, each with its caption in a ``.txt``
                 file of the same stem beside it (``cat.jpg`` + ``cat.txt``).

Precomputed maps live beside their image, named after its stem:
``<stem>.depth.png`` or ``<stem>.depth.npy`` (relative depth, normalised per image to [0, 1],
near = bright), ``<stem>.labels.png`` or ``<stem>.labels.npy`` (single-channel class indices,
ADE20K order for ADE20K colours). Such files are never taken for images.

A map or control image whose size differs from its image is resized to it if the aspect
ratio matches, and is a bad sample otherwise. Setup checks every sample's listing,
caption, image header and required map; decoding happens per sample at load time.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datamodules.decode import probe_image, read_depth, read_labels, read_rgb
from datamodules.errors import BadSampleError
from datamodules.transforms import fit_to_image

log = logging.getLogger(__name__)

FORMATS = ("auto", "imagefolder", "controlnet", "txt")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MAP_NAMES = ("depth", "labels")
MAP_SUFFIXES = (".png", ".npy")
ON_BAD_SAMPLE = ("error", "skip")

# How each kind of per-pixel file is read, and whether it is resampled nearest-neighbour.
_READERS = {"control": (read_rgb, False), "depth": (read_depth, False), "labels": (read_labels, True)}


@dataclass(frozen=True)
class Record:
    """One listed sample. `problem` is set when the listing itself is broken."""

    key: str  # image path relative to the root, or where the broken listing is
    image: Path | None
    caption: str | None
    control: Path | None = None
    depth: Path | None = None
    labels: Path | None = None
    problem: str | None = None
    listed_at: str | None = None  # "<listing>, line <n>" for listed samples


def detect_format(root: Path) -> str:
    if (root / "metadata.jsonl").is_file():
        return "imagefolder"
    if (root / "prompt.json").is_file():
        return "controlnet"
    if any(image.with_suffix(".txt").is_file() for image in _image_files(root)):
        return "txt"
    raise ValueError(
        f"{root}: found no metadata.jsonl, prompt.json or image + .txt caption pairs; "
        f"check the path or set data.format to one of {FORMATS[1:]}"
    )


def index_folder(
    root: str | Path,
    format: str = "auto",
    source_map: str | None = None,
    map_required: bool = False,
    on_bad_sample: str = "error",
) -> list[Record]:
    """List and check a folder's samples; bad ones raise or are skipped (and counted) here.

    `source_map` is the map the annotator reads ("control", "depth", "labels" or None);
    with `map_required` a sample lacking it is bad.
    """
    root = Path(root)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}")
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    format = detect_format(root) if format == "auto" else format
    records = {"imagefolder": _list_imagefolder, "controlnet": _list_controlnet, "txt": _list_txt}[format](root)
    if not records:
        raise ValueError(f"{root}: no images found in {format} format")
    good = []
    for record in records:
        try:
            _check(record, source_map, map_required)
            good.append(record)
        except BadSampleError as err:
            if on_bad_sample == "error":
                raise
            log.warning("skipping bad sample %s", err)
    if skipped := len(records) - len(good):
        log.warning("skipped %d of %d samples in %s", skipped, len(records), root)
    if not good:
        raise ValueError(f"{root}: every one of its {len(records)} samples is bad")
    return good


class FolderSource:
    """Checked records as a sequence of decoded samples (dicts of arrays)."""

    def __init__(self, records: list[Record], source_map: str | None = None):
        self.records, self.source_map = records, source_map

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with _naming_the_listing(record):
            image = read_rgb(record.image)
            sample = {"image": image, "caption": record.caption, "key": record.key, "path": record.image}
            map_path = getattr(record, self.source_map) if self.source_map else None
            if map_path is not None:
                read, nearest = _READERS[self.source_map]
                sample[self.source_map] = fit_to_image(read(map_path), image.shape, nearest, where=map_path)
        return sample


@contextmanager
def _naming_the_listing(record: Record):
    """A file's problem also names the listing line that lists the file."""
    try:
        yield
    except BadSampleError as err:
        if record.listed_at is None or record.listed_at in err.where:
            raise
        raise BadSampleError(f"{err.where} (listed at {record.listed_at})", err.problem) from err


def _check(record: Record, source_map: str | None, map_required: bool) -> None:
    with _naming_the_listing(record):
        _check_files(record, source_map, map_required)


def _check_files(record: Record, source_map: str | None, map_required: bool) -> None:
    if record.problem:
        raise BadSampleError(record.key, record.problem)
    probe_image(record.image)
    if not record.caption or not record.caption.strip():
        raise BadSampleError(record.image, "missing or empty caption")
    if source_map is None:
        return
    map_path = getattr(record, source_map)
    if map_path is None and map_required:
        if source_map == "control":
            expected = "a control image in the listing"
        else:
            expected = " or ".join(f"{record.image.stem}.{source_map}{suffix}" for suffix in MAP_SUFFIXES)
        raise BadSampleError(record.image, f"no {source_map} map (expected {expected})")
    if source_map == "control" and map_path is not None:
        probe_image(map_path)


def _list_imagefolder(root: Path) -> list[Record]:
    return _list_json_lines(
        root / "metadata.jsonl", image_key="file_name", caption_key="text", control_key="conditioning_image"
    )


def _list_controlnet(root: Path) -> list[Record]:
    return _list_json_lines(root / "prompt.json", image_key="target", caption_key="prompt", control_key="source")


def _list_json_lines(listing: Path, image_key: str, caption_key: str, control_key: str) -> list[Record]:
    """One record per line; a line that cannot be a sample is a record with its `problem`."""
    records = []
    for number, raw in enumerate(listing.read_bytes().splitlines(), start=1):
        where = f"{listing}, line {number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte order mark is no content
        except UnicodeDecodeError as err:
            records.append(Record(where, None, None, problem=f"not UTF-8 text ({err})"))
            continue
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            records.append(Record(where, None, None, problem=f"not valid JSON ({err})"))
            continue
        if not isinstance(entry, dict) or image_key not in entry or caption_key not in entry:
            records.append(Record(where, None, None, problem=f"needs keys {image_key!r} and {caption_key!r}"))
            continue
        if problem := _listing_problem(entry, image_key, caption_key, control_key):
            records.append(Record(where, None, None, problem=problem))
            continue
        image = listing.parent / entry[image_key]
        control = listing.parent / entry[control_key] if entry.get(control_key) else None
        caption = entry[caption_key]
        records.append(Record(entry[image_key], image, caption, control, *_maps_beside(image), listed_at=where))
    return records


def _listing_problem(entry: dict, image_key: str, caption_key: str, control_key: str) -> str | None:
    """What makes a listing entry's values unusable: paths must be non-empty strings, the caption a string."""
    for key in (image_key, control_key):
        value = entry.get(key)
        if (key == image_key or value is not None) and not (isinstance(value, str) and (value or key == control_key)):
            return f"{key!r} must be a file path (a non-empty string), got {json.dumps(value)}"
    if not isinstance(entry[caption_key], (str, type(None))):
        return f"{caption_key!r} must be a string, got {json.dumps(entry[caption_key])}"
    return None


def _list_txt(root: Path) -> list[Record]:
    records = []
    for image in _image_files(root):
        caption_file = image.with_suffix(".txt")
        caption = None
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                records.append(Record(str(caption_file), image, None, problem=f"unreadable caption ({err})"))
                continue
        records.append(Record(str(image.relative_to(root)), image, caption, None, *_maps_beside(image)))
    return records


def _image_files(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and Path(path.stem).suffix.lstrip(".") not in MAP_NAMES
        and path.is_file()
    )


def _maps_beside(image: Path) -> tuple[Path | None, Path | None]:
    """(depth, labels) files named after `image`, if present."""
    found = []
    for name in MAP_NAMES:
        candidates = (image.with_name(f"{image.stem}.{name}{suffix}") for suffix in MAP_SUFFIXES)
        found.append(next((c for c in candidates if c.is_file()), None))
    return tuple(found)
