"""Hugging Face datasets as training data: `hf:OWNER/NAME[:split]`, a `save_to_disk` folder, parquet files.

Read through the `datasets` library, without streaming: the dataset is downloaded (or opened from
disk) once and its rows are read by index. It becomes the same `ImageFolder` an image folder does,
with `Row` items for files, so the latent cache, bad-image skipping, class tables and the data
order see no difference. The cache keys on the dataset's fingerprint and the row numbers.

`open_data` is the one entry point for training data: a folder of images goes to
`engine.data.images.scan_image_folder`, anything a dataset goes here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from difffit.engine.data.captions import TEXT_COLUMNS
from difffit.engine.data.images import (
    BadImage,
    ImageFolder,
    Row,
    Size,
    image_size,
    load_image,
    scan_image_folder,
    to_rgb,
)
from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

HF_PREFIX = "hf:"
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # NAME (a canonical dataset) or OWNER/NAME
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # written by save_to_disk
IMAGE_COLUMNS = ("image", "img", "picture")
LABEL_COLUMNS = ("label", "labels", "class", "fine_label")
STRINGS = ("string", "large_string")  # the datasets Value dtypes of text


def is_dataset(spec: str) -> bool:
    """hf:OWNER/NAME[:split], a save_to_disk folder, or a folder of parquet files."""
    if spec.startswith(HF_PREFIX):
        return True
    path = _local_path(spec)[0]
    return path.is_dir() and (any((path / m).is_file() for m in SAVED_MARKERS) or bool(_parquet_files(path)))


def open_data(
    spec: str, image_column: str | None = None, label_column: str | None = None, caption_column: str | None = None
) -> ImageFolder:
    """Training data from an image folder or a dataset (see the module docstring).

    A dataset's captions come from `caption_column` (default: `text`, else `caption`, when present);
    an image folder's captions are found by `engine.data.captions.attach_captions`, which takes
    `caption_column` for its metadata files.
    """
    if not is_dataset(spec):
        if image_column or label_column:
            raise DiffFitError(
                f"--image-column and --label-column apply to datasets; {spec} is an image folder.",
                hint="Leave them out, or pass hf:OWNER/NAME, a save_to_disk folder or parquet files.",
            )
        return scan_image_folder(spec)
    dataset = _load(spec)
    image_column = image_column or _default_column(dataset, "Image", IMAGE_COLUMNS, "image")
    label_column = label_column or _default_column(dataset, "ClassLabel", LABEL_COLUMNS, None)
    # A usual caption column is taken as captions only when it holds strings: class-conditional data may have a
    # `text` column of something else, which it never reads; --caption-column names one to be checked.
    caption_column = caption_column or next(
        (
            c
            for c in TEXT_COLUMNS
            if c in dataset.column_names and getattr(dataset.features[c], "dtype", None) in STRINGS
        ),
        None,
    )
    for option, column in (
        ("--image-column", image_column),
        ("--label-column", label_column),
        ("--caption-column", caption_column),
    ):
        if column is not None and column not in dataset.column_names:
            raise DiffFitError(
                f"{spec} has no column {column!r} ({option}); its columns: {', '.join(dataset.column_names)}."
            )
    name = spec if spec.startswith(HF_PREFIX) else str(_local_path(spec)[0])
    labels, class_names, unlabelled = _labels(dataset, label_column, name)
    rows = [i for i in range(len(dataset)) if i not in unlabelled]
    if not rows:
        raise DiffFitError(f"{spec} has no labelled rows (column {label_column!r}).")
    captions = _captions(dataset, caption_column, name) if caption_column else None
    return ImageFolder(
        Path(name),
        [Row(i, name) for i in rows],
        [labels[i] for i in rows],
        class_names,
        skipped=[(Row(i, name), "no label") for i in sorted(unlabelled)],
        rows=HFRows(dataset, image_column),
        captions=None if captions is None else [captions[i] for i in rows],
    )


class HFRows:
    """The image column of a dataset, decoded by us (`engine.data.images.load_image`), so a broken row is named
    and skipped exactly like a broken file. Picklable: data-loader workers get their own copy."""

    def __init__(self, dataset: Dataset, column: str):
        from datasets import Image as ImageFeature

        self.fingerprint = dataset._fingerprint  # before the cast below, which makes a new one
        self.column = column
        dataset = dataset.select_columns([column])
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))  # bytes/path, decoded in load()
        self.dataset = dataset

    def load(self, index: int) -> Image.Image:
        value = self._image(index)
        return to_rgb(value) if isinstance(value, Image.Image) else load_image(value)

    def size(self, index: int) -> Size:
        return image_size(self._image(index))

    def _image(self, index: int) -> io.BytesIO | Path | Image.Image:
        """Row `index`'s image as bytes to decode, a file, or a decoded image (a column of PIL images)."""
        value = self.dataset[index][self.column]
        if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return io.BytesIO(value)
        if isinstance(value, str):
            return Path(value)
        if isinstance(value, Image.Image):
            return value
        raise BadImage("no image in this row" if value is None else f"not an image ({type(value).__name__})")

    def signature(self, rows: Sequence[int]) -> str:
        digest = hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()
        return f"dataset {self.fingerprint}\ncolumn {self.column}\nrows {digest}\n"


# -- loading --------------------------------------------------------------------------------------


def hub_dataset(spec: str) -> tuple[str, str]:
    """hf:[OWNER/]NAME[:split] -> (the dataset's hub name, the split or ""); one sentence for a spec that
    names no dataset (checked with the options, before anything loads)."""
    name, _, split = spec[len(HF_PREFIX) :].partition(":")
    if not HUB_DATASET.match(name):
        raise DiffFitError(
            f"{spec} does not name a Hugging Face dataset.",
            hint="Write hf:OWNER/NAME or hf:OWNER/NAME:split, e.g. hf:cifar10:train.",
        )
    return name, split


def _local_path(spec: str) -> tuple[Path, str | None]:
    """(folder, split) of a local spec: DIR, or DIR:split when DIR exists and DIR:split does not."""
    path = Path(spec).expanduser()
    head, sep, split = spec.rpartition(":")
    if not path.exists() and sep and head and Path(head).expanduser().is_dir():
        return Path(head).expanduser(), split
    return path, None


def _parquet_files(path: Path) -> list[str]:
    """Parquet files in the folder or one level down (the Hub's data/train-*.parquet), never a deep walk:
    an image folder of a million files must not pay for this check."""
    return sorted(str(p) for pattern in ("*.parquet", "*/*.parquet") for p in path.glob(pattern))


def _load(spec: str):
    """The Dataset (one split) a spec names; every failure is one sentence."""
    import datasets

    try:
        if spec.startswith(HF_PREFIX):
            name, split = hub_dataset(spec)
            _check_disk_space(name)
            return _one_split(datasets.load_dataset(name, split=split or None), spec, split)
        path, split = _local_path(spec)
        if any((path / m).is_file() for m in SAVED_MARKERS):
            return _one_split(datasets.load_from_disk(str(path)), spec, split)
        files = _parquet_files(path)
        return _one_split(datasets.load_dataset("parquet", data_files=files, split=split or None), spec, split)
    except DiffFitError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiffFitError(
                f"The dataset {spec} does not fit on the disk of the Hugging Face cache.",
                hint="Free space, or point HF_HOME at a larger disk.",
            ) from None
        raise DiffFitError(f"Cannot load the dataset {spec} ({error_summary(exc)}).") from None
    except Exception as exc:  # datasets raises many types (hub errors, missing splits, bad files)
        raise DiffFitError(
            f"Cannot load the dataset {spec} ({error_summary(exc)}).",
            hint="Check the name and split; offline, only datasets already in the cache load.",
        ) from None


def _one_split(loaded: Dataset | DatasetDict, spec: str, split: str | None) -> Dataset:
    """A Dataset from what `datasets` returned: a DatasetDict gives `split`, else its train split or its only one."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    split = split or ("train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded)))
    if split not in loaded:
        raise DiffFitError(
            f"{spec} has no split {split!r}; its splits: {', '.join(loaded)}.",
            hint=f"Name one after a colon, e.g. {spec.rsplit(':', 1)[0]}:{next(iter(loaded))}.",
        )
    return loaded[split]


def _check_disk_space(name: str) -> None:
    """Refuse a hub dataset larger than the free space of the cache, before downloading any of it."""
    import datasets

    info = datasets.load_dataset_builder(name).info
    needed = (info.download_size or 0) + (info.dataset_size or 0)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise DiffFitError(
            f"The dataset {name} needs about {needed / 1e9:.1f} GB and {cache} has {free / 1e9:.1f} GB free.",
            hint="Free space, or point HF_HOME at a larger disk.",
        )


# -- columns and classes --------------------------------------------------------------------------


def _default_column(dataset: Dataset, feature_type: str, names: tuple[str, ...], fallback: str | None) -> str | None:
    """The first column of the feature type (Image, ClassLabel), else a usual name, else `fallback`."""
    for column, feature in dataset.features.items():
        if type(feature).__name__ == feature_type:
            return column
    return next((c for c in names if c in dataset.column_names), fallback)


def _captions(dataset: Dataset, column: str, name: str) -> list[str]:
    """The caption of each row, stripped; "" where a row has none (attach_captions names those rows)."""
    captions = []
    for i, value in enumerate(dataset.select_columns([column])[column]):
        if value is not None and not isinstance(value, str):
            raise DiffFitError(
                f"{name} row {i}: the caption column {column!r} holds {type(value).__name__}, not text.",
                hint="Name a column of strings with --caption-column.",
            )
        captions.append((value or "").strip())
    return captions


def _labels(dataset: Dataset, column: str | None, name: str) -> tuple[list[int], list[str], set[int]]:
    """(label per row, class names, rows without a label). Names: a ClassLabel's, else the sorted values."""
    from datasets import ClassLabel

    if column is None:  # unlabelled: one class, as a flat folder is
        return [0] * len(dataset), [Path(hub_dataset(name)[0] if name.startswith(HF_PREFIX) else name).name], set()
    values = list(dataset.select_columns([column])[column])
    feature = dataset.features[column]
    missing = {i for i, v in enumerate(values) if v is None or (isinstance(feature, ClassLabel) and v == -1)}
    if isinstance(feature, ClassLabel):
        return [-1 if i in missing else int(v) for i, v in enumerate(values)], list(feature.names), missing
    present = sorted({v for i, v in enumerate(values) if i not in missing}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(present)}
    return [index.get(v, -1) for v in values], [str(v) for v in present], missing
