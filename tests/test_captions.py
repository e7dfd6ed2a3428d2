"""Captions: each source, their precedence, alignment through every subset, and one-sentence refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from difffit.engine.data.captions import attach_captions
from difffit.engine.data.hf_datasets import open_data
from difffit.engine.data.images import ImageFolder, scan_image_folder
from difffit.engine.errors import DiffFitError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 20 % 255, 0, 0)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _captions(folder: ImageFolder) -> dict[str, str]:
    return {str(f.relative_to(folder.root)): c for f, c in zip(folder.files, folder.captions, strict=True)}


@pytest.fixture
def classes(tmp_path) -> Path:
    """Two class folders, cats (c0-c2) and hot_dogs (h0-h1)."""
    for name in ("c0", "c1", "c2"):
        _image(tmp_path / "data" / "cats" / f"{name}.png")
    for name in ("h0", "h1"):
        _image(tmp_path / "data" / "hot_dogs" / f"{name}.jpg")
    return tmp_path / "data"


def test_sidecars_then_metadata_then_template_per_image(classes):
    (classes / "cats" / "c0.txt").write_text("  a sleepy cat \n", encoding="utf-8")
    (classes / "cats" / "c1.txt").write_text("   \n")  # empty: falls through to the next source
    _jsonl(
        classes / "metadata.jsonl",
        [
            {"file_name": "cats/c0.png", "text": "loses to the sidecar"},
            {"file_name": "cats/c1.png", "text": "from the root metadata"},
        ],
    )
    (classes / "hot_dogs" / "metadata.csv").write_text('file_name,text\nh0.jpg,"a hot dog, with mustard"\n')
    folder = attach_captions(scan_image_folder(classes), caption_template="a photo of {class}")
    assert _captions(folder) == {
        "cats/c0.png": "a sleepy cat",
        "cats/c1.png": "from the root metadata",
        "cats/c2.png": "a photo of cats",
        "hot_dogs/h0.jpg": "a hot dog, with mustard",
        "hot_dogs/h1.jpg": "a photo of hot dogs",  # underscores read as spaces
    }


def test_the_nearest_metadata_file_wins(classes):
    _jsonl(
        classes / "metadata.jsonl",
        [{"file_name": f"cats/c{i}.png", "text": f"root {i}"} for i in range(3)]
        + [{"file_name": f"hot_dogs/h{i}.jpg", "text": f"root h{i}"} for i in range(2)],
    )
    _jsonl(classes / "cats" / "metadata.jsonl", [{"file_name": "c1.png", "text": "nearer"}])
    captions = _captions(attach_captions(scan_image_folder(classes)))
    assert captions["cats/c1.png"] == "nearer" and captions["cats/c0.png"] == "root 0"
    assert captions["hot_dogs/h1.jpg"] == "root h1"


@pytest.mark.parametrize(
    "columns, option, expected",
    [
        ({"text": "t", "caption": "c"}, None, "t"),  # text before caption
        ({"caption": "c", "n": 3}, None, "c"),
        ({"prompt": "p", "width": 512}, None, "p"),  # the only string column
        ({"text": "t", "prompt": "p"}, "prompt", "p"),  # --caption-column wins
    ],
)
def test_metadata_text_column(tmp_path, columns, option, expected):
    _image(tmp_path / "flat" / "a.png")
    _jsonl(tmp_path / "flat" / "metadata.jsonl", [{"file_name": "a.png", **columns}])
    folder = attach_captions(scan_image_folder(tmp_path / "flat"), caption_column=option)
    assert folder.captions == [expected]


def test_csv_numbers_are_not_a_text_column(tmp_path):
    _image(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "metadata.csv").write_text("file_name,width,prompt\na.png,512,a red square\n")
    assert attach_captions(scan_image_folder(tmp_path / "flat")).captions == ["a red square"]


def test_captions_stay_aligned_through_every_subset(classes):
    for item in scan_image_folder(classes).files:
        item.with_suffix(".txt").write_text(f"caption of {item.stem}")
    folder = attach_captions(scan_image_folder(classes))
    expected = {f: f"caption of {f.stem}" for f in folder.files}

    def aligned(subset: ImageFolder) -> bool:
        return all(expected[f] == c for f, c in zip(subset.files, subset.captions, strict=True))

    taken = folder.take([4, 0, 2])
    assert [f.stem for f in taken.files] == ["h1", "c0", "c2"] and aligned(taken)
    without = folder.without({folder.files[1]: "broken", folder.files[3]: "broken"})
    assert [f.stem for f in without.files] == ["c0", "c2", "h1"] and aligned(without)
    assert len(without.captions) == len(without.labels) == 3
    with pytest.raises(ValueError, match="aligned"):
        ImageFolder(folder.root, folder.files, folder.labels, folder.class_names, captions=folder.captions[:-1])


def test_uncaptioned_images_are_named_with_a_count(tmp_path):
    for i in range(8):
        _image(tmp_path / "flat" / f"img{i}.png")
    (tmp_path / "flat" / "img3.txt").write_text("only this one")
    with pytest.raises(
        DiffFitError,
        match=r"7 of 8 images .* no caption: img0.png, img1.png, img2.png, img4.png, "
        r"img5.png and 2 more\.",
    ) as raised:
        attach_captions(scan_image_folder(tmp_path / "flat"))
    assert "--caption-template" in raised.value.hint


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda d: (d / "a.txt").write_bytes(b"caf\xe9 au lait"), "a.txt is not UTF-8"),
        (
            lambda d: _jsonl(
                d / "metadata.jsonl",
                [
                    {"file_name": "a.png", "text": "x"},
                    {"file_name": "gone.png", "text": "y"},
                    {"file_name": "sub/lost.png", "text": "z"},
                ],
            ),
            "names 2 file.* that do not exist: gone.png, sub/lost.png",
        ),
        (
            lambda d: _jsonl(d / "metadata.jsonl", [{"file_name": "a.png", "width": 3, "tags": ["x"]}]),
            "no text column .*its columns: file_name, width, tags",
        ),
        (lambda d: _jsonl(d / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}]), "no column 'prompt'"),
        (
            lambda d: (d / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n'),
            "line 2 is not valid JSON",
        ),
        (lambda d: _jsonl(d / "metadata.jsonl", [{"image": "a.png", "text": "x"}]), "no file_name column"),
        (lambda d: _jsonl(d / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}] * 2), "lists a.png twice"),
        (lambda d: _jsonl(d / "metadata.jsonl", [{"file_name": "a.png", "text": 7}]), "text is int 7, not text"),
        (
            lambda d: ((d / "metadata.csv").write_text("file_name,text\n"), _jsonl(d / "metadata.jsonl", [])),
            "both metadata.jsonl and metadata.csv",
        ),
        (lambda d: (d / "metadata.csv").write_bytes(b"file_name,text\na.png,\xff\n"), "metadata.csv is not UTF-8"),
    ],
)
def test_bad_caption_sources_are_one_sentence(tmp_path, setup, words):
    _image(tmp_path / "flat" / "a.png")
    setup(tmp_path / "flat")
    column = "prompt" if "prompt" in words else None
    with pytest.raises(DiffFitError, match=words):
        attach_captions(scan_image_folder(tmp_path / "flat"), caption_column=column)


def test_template_needs_the_class_placeholder(classes):
    with pytest.raises(DiffFitError, match=r"has no \{class\} placeholder"):
        attach_captions(scan_image_folder(classes), caption_template="a photo of {klass}")
    # Other braces are text, not format fields.
    folder = attach_captions(scan_image_folder(classes), caption_template="{class} {0} {}")
    assert folder.captions[0] == "cats {0} {}"


def test_metadata_in_an_output_folder_is_not_read(tmp_path):
    """difffit's own outputs are never data (images.image_files): their metadata is not read either."""
    _image(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "a.txt").write_text("a caption")
    folder = scan_image_folder(tmp_path / "flat")
    (tmp_path / "flat" / ".difffit").write_text("{}")  # the root marked afterwards: its metadata is skipped
    _jsonl(tmp_path / "flat" / "metadata.jsonl", [{"file_name": "gone.png", "text": "x"}])
    assert attach_captions(folder).captions == ["a caption"]


# -- datasets ---------------------------------------------------------------------------------------


def _dataset(tmp_path: Path, **columns) -> Path:
    import io

    import datasets

    def png(i: int) -> dict:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    n = len(next(iter(columns.values())))
    features = {"image": datasets.Image(), **{k: datasets.Value("string") for k in columns}}
    data = datasets.Dataset.from_dict(
        {"image": [png(i) for i in range(n)], **columns}, features=datasets.Features(features)
    )
    data.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_dataset_caption_column(tmp_path):
    data = _dataset(tmp_path, text=["  one ", "two", "three"], alt=["a", "b", "c"])
    assert open_data(str(data)).captions == ["one", "two", "three"]  # `text` by default
    assert attach_captions(open_data(str(data), caption_column="alt")).captions == ["a", "b", "c"]
    with pytest.raises(DiffFitError, match="no column 'prompt'"):
        open_data(str(data), caption_column="prompt")


def test_dataset_rows_without_caption_are_named_or_templated(tmp_path):
    data = _dataset(tmp_path, text=["one", None, ""])
    folder = open_data(str(data))
    with pytest.raises(DiffFitError, match=r"2 of 3 images .* no caption: .*ds row 1, .*ds row 2\."):
        attach_captions(folder)
    assert attach_captions(folder, caption_template="a photo of {class}").captions == [
        "one",
        "a photo of ds",
        "a photo of ds",
    ]


def test_dataset_without_caption_column_needs_one(tmp_path):
    data = _dataset(tmp_path, name=["x", "y"])
    folder = open_data(str(data))
    assert folder.captions is None
    with pytest.raises(DiffFitError, match="has no caption column"):
        attach_captions(folder)
    assert attach_captions(open_data(str(data), caption_column="name")).captions == ["x", "y"]


def test_captions_keep_newlines_and_separator_characters(tmp_path):
    """A quoted CSV caption keeps its newline, and its \\x1e is text, not the start of a row; JSON Lines end
    at "\\n" only, so U+2028 and U+0085 inside a caption (valid JSON) stay in it."""
    for name in ("a", "b", "c"):
        _image(tmp_path / "csv" / f"{name}.png")
        _image(tmp_path / "jsonl" / f"{name}.png")
    (tmp_path / "csv" / "metadata.csv").write_text(
        'file_name,text\na.png,"a red ring\non a dark table"\nb.png,"left\x1ec.png"\nc.png,plain\n', encoding="utf-8"
    )
    folder = attach_captions(scan_image_folder(tmp_path / "csv"))
    assert _captions(folder) == {"a.png": "a red ring\non a dark table", "b.png": "left\x1ec.png", "c.png": "plain"}
    rows = [
        {"file_name": "a.png", "text": "one\u2028two"},
        {"file_name": "b.png", "text": "three\x85four"},
        {"file_name": "c.png", "text": "five\x1csix"},
    ]
    (tmp_path / "jsonl" / "metadata.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    folder = attach_captions(scan_image_folder(tmp_path / "jsonl"))
    assert _captions(folder) == {"a.png": "one\u2028two", "b.png": "three\x85four", "c.png": "five\x1csix"}


def test_every_name_of_an_image_trains_with_its_own_caption(tmp_path):
    """Hard links and symbolic links to one file are images of their own, each with its sidecar caption."""
    first = _image(tmp_path / "data" / "img00.png")
    first.with_suffix(".txt").write_text("the first name")
    for i in range(1, 4):
        (tmp_path / "data" / f"img0{i}.txt").write_text(f"name {i}")
    (tmp_path / "data" / "img01.png").hardlink_to(first)
    (tmp_path / "data" / "img02.png").symlink_to("img00.png")
    (tmp_path / "data" / "img03.png").symlink_to(first)
    folder = attach_captions(scan_image_folder(tmp_path / "data"))
    assert _captions(folder) == {
        "img00.png": "the first name",
        "img01.png": "name 1",
        "img02.png": "name 2",
        "img03.png": "name 3",
    }


def test_a_caption_file_linked_from_outside_the_data_is_named(tmp_path, capsys):
    for name in ("a", "b", "c"):
        _image(tmp_path / "data" / f"{name}.png")
    (tmp_path / "diary.txt").write_text("my private diary")
    (tmp_path / "data" / "a.txt").symlink_to(tmp_path / "diary.txt")
    (tmp_path / "data" / "b.txt").symlink_to("c.txt")  # a link inside the data folder: nothing to say
    (tmp_path / "data" / "c.txt").write_text("a square")
    folder = attach_captions(scan_image_folder(tmp_path / "data"))
    assert folder.captions == ["my private diary", "a square", "a square"]
    assert folder.outside_captions == {"my private diary": str(tmp_path / "data" / "a.txt")}
    err = " ".join(capsys.readouterr().err.split())
    assert f"1 caption(s) come from files outside {tmp_path / 'data'}" in err and "diary.txt" in err, err
    (tmp_path / "data" / "a.txt").unlink()  # a metadata file linked from elsewhere: its captions are named too
    (tmp_path / "table.jsonl").write_text('{"file_name": "a.png", "text": "from a linked table"}\n')
    (tmp_path / "data" / "metadata.jsonl").symlink_to(tmp_path / "table.jsonl")
    folder = attach_captions(scan_image_folder(tmp_path / "data"))
    assert folder.outside_captions == {"from a linked table": str(tmp_path / "data" / "metadata.jsonl")}
    (tmp_path / "data" / "metadata.jsonl").unlink()
    (tmp_path / "data" / "a.txt").write_text("mine")
    capsys.readouterr()
    assert attach_captions(scan_image_folder(tmp_path / "data")).outside_captions == {}
    assert capsys.readouterr().err == ""
