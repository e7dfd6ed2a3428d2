"""Hugging Face datasets as training data: save_to_disk and parquet folders, class names, cache, bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from difffit.engine.data.hf_datasets import is_dataset, open_data
from difffit.engine.data.images import Row, find_bad_images
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import read_adapter
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit


def make_dataset(toy_data: Path, broken_row: bool = False):
    """The fixture images as a dataset with a ClassLabel (names deliberately not in sorted order)."""
    import datasets

    files = sorted(toy_data.rglob("*.png"))
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    if broken_row:
        images[3] = {"bytes": b"not a png", "path": None}
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["red", "blue"])})
    kinds = [1 if f.parent.name == "blue" else 0 for f in files]
    return datasets.Dataset.from_dict({"picture": images, "kind": kinds}, features=features)


@pytest.fixture
def saved(tmp_path, toy_data) -> Path:
    make_dataset(toy_data).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.fixture
def parquet(tmp_path, toy_data) -> Path:
    (tmp_path / "pq").mkdir()
    make_dataset(toy_data).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    return tmp_path / "pq"


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_dataset_trains_and_keeps_class_names(tmp_path, kind, request, tiny_base_file, tiny_vae_dir):
    data = request.getfixturevalue(kind)
    assert is_dataset(str(data))
    folder = open_data(str(data))
    assert folder.class_names == ["red", "blue"] and len(folder) == 12 and sorted(set(folder.labels)) == [0, 1]
    assert folder.load(folder.files[0]).mode == "RGB"
    options = dict(
        data=str(data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=2,
        batch_size=4,
        save_every=0,
        sample_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    result = fit(FitConfig(**options, out=str(tmp_path / "run")), progress=False)
    assert result.classes == 2 and result.images == 12
    assert read_adapter(result.adapter)[1].class_names == ["red", "blue"]
    # The cache keys on the dataset's fingerprint and rows: a second run reuses it.
    again = fit(FitConfig(**options, out=str(tmp_path / "again")), progress=False)
    assert again.cache == result.cache


def test_bad_rows_are_named_and_skipped(tmp_path, toy_data):
    make_dataset(toy_data, broken_row=True).save_to_disk(str(tmp_path / "broken"))
    folder = open_data(str(tmp_path / "broken"))
    bad = find_bad_images(folder, 16, progress=False)
    row = Row(3, str(tmp_path / "broken"))
    assert list(bad) == [row] and "not a readable image" in bad[row]
    assert str(row) == f"{tmp_path / 'broken'} row 3"  # how the skipped row is named on stderr


def test_columns_labels_and_errors(tmp_path, toy_data):
    import datasets

    files = sorted(toy_data.rglob("*.png"))
    plain = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "species": [f.parent.name if i % 5 else None for i, f in enumerate(files)],
        },
        features=datasets.Features({"img": datasets.Image(), "species": datasets.Value("string")}),
    )
    plain.save_to_disk(str(tmp_path / "plain"))
    folder = open_data(str(tmp_path / "plain"), label_column="species")
    assert folder.class_names == ["blue", "red"]  # sorted unique values when there is no ClassLabel
    assert [str(item) for item, _ in folder.skipped] == [f"{tmp_path / 'plain'} row {i}" for i in (0, 5, 10)]
    one_class = open_data(str(tmp_path / "plain"))  # no label column found: one class
    assert one_class.class_names == ["plain"] and len(one_class) == 12
    plain.add_column("text", list(range(len(files)))).save_to_disk(str(tmp_path / "numbered"))
    assert open_data(str(tmp_path / "numbered")).captions is None  # a `text` column of numbers is no caption
    with pytest.raises(DiffFitError, match="holds int, not text"):
        open_data(str(tmp_path / "numbered"), caption_column="text")
    with pytest.raises(DiffFitError, match="no column 'photo'"):
        open_data(str(tmp_path / "plain"), image_column="photo")
    with pytest.raises(DiffFitError, match="apply to datasets"):
        open_data(str(toy_data), label_column="species")
    with pytest.raises(DiffFitError, match="Cannot load the dataset hf:nobody/nothing"):
        open_data("hf:nobody/nothing")


def test_default_out_dir_of_a_hub_dataset_is_a_plain_folder_name():
    from difffit.engine.training.config import default_out_dir

    assert default_out_dir("hf:nelorth/oxford-flowers:train", "difffit") == Path("runs/oxford-flowers-train-difffit")
    assert default_out_dir("hf:owner/cub200", "lora") == Path("runs/cub200-lora")
