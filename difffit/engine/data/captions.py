"""Captions for text-to-image training: one per image, from the first source that has one.

Precedence, per image:
1. a sidecar `NAME.txt` beside `NAME.png` (UTF-8; surrounding whitespace stripped);
2. a `metadata.jsonl` or `metadata.csv` (the Hugging Face imagefolder convention: `file_name` relative
   to the metadata file's own folder, plus a text column) in the data root or any sub-folder; where two
   metadata files list the same image, the one nearest to it (the deeper folder) wins;
3. a dataset's caption column (`hf:` data: `engine.data.hf_datasets.open_data` fills them);
4. `--caption-template "a photo of {class}"`: the image's class folder name, underscores as spaces.

An empty caption counts as none, so an empty `NAME.txt` falls through to the next source. An image
left without a caption is an error naming it: it is never trained with an empty caption by accident
(the unconditional branch is trained on purpose, by `--caption-dropout`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from difffit.engine.data.images import ImageFolder, Row
from difffit.engine.errors import DiffFitError
from difffit.engine.io import check_readable, has_marker
from difffit.engine.progress import say

TEXT_COLUMNS = ("text", "caption")  # the default caption column, in order; then the only string column
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
PLACEHOLDER = "{class}"
SHOWN = 5  # names listed in an error before "and N more"
HINT = (
    "Put NAME.txt beside each image, list it in a metadata.jsonl (file_name, text), or caption the class "
    'folders with --caption-template "a photo of {class}".'
)


def attach_captions(
    folder: ImageFolder, *, caption_column: str | None = None, caption_template: str | None = None
) -> ImageFolder:
    """The folder with `captions` filled from the sources above, or a DiffFitError naming what is missing.

    `caption_column` names the metadata files' text column (for a dataset, `open_data` takes it).
    """
    check_template(caption_template)
    if folder.rows is not None:
        if folder.captions is None and caption_template is None:
            raise DiffFitError(
                f"The dataset {folder.root} has no caption column ({' or '.join(TEXT_COLUMNS)}).",
                hint="Name it with --caption-column, or caption the classes with --caption-template.",
            )
        found = list(folder.captions or [""] * len(folder))
    else:
        listed, sources = metadata_captions(folder, caption_column)
        found, outside = [], {}
        for path in folder.files:
            caption, source = sidecar_caption(path), path.with_suffix(".txt")
            if not caption:
                caption, source = listed.get(_normal(path), ""), sources.get(_normal(path))
            if caption and source is not None and outside_of(source, folder.root):
                outside.setdefault(caption, str(source))
            found.append(caption)
        folder = replace(folder, outside_captions=outside)
        if outside:
            some = next(iter(outside.values()))
            say(
                (
                    f"{len(outside)} caption(s) come from files outside {folder.root} (such as {some} -> "
                    f"{Path(some).resolve()}); they are trained on, and a model card may quote them.",
                    "yellow",
                )
            )
    if caption_template is not None:
        found = [
            caption or template_caption(caption_template, folder.class_names[label])
            for caption, label in zip(found, folder.labels, strict=True)
        ]
    missing = [item for item, caption in zip(folder.files, found, strict=True) if not caption]
    if missing:
        names = _some([str(item) if isinstance(item, Row) else str(item.relative_to(folder.root)) for item in missing])
        raise DiffFitError(
            f"{len(missing)} of {len(folder)} images in {folder.root} have no caption: {names}.", hint=HINT
        )
    return replace(folder, captions=found)


def check_template(template: str | None) -> None:
    """A caption template must say where the class name goes."""
    if template is not None and PLACEHOLDER not in template:
        raise DiffFitError(
            f"--caption-template {template!r} has no {PLACEHOLDER} placeholder for the class name.",
            hint='For example: --caption-template "a photo of {class}".',
        )


def template_caption(template: str, class_name: str) -> str:
    # str.replace, not str.format: other braces in a template are text, not fields.
    return template.replace(PLACEHOLDER, class_name.replace("_", " ")).strip()


def sidecar_caption(image: Path) -> str:
    """The stripped text of NAME.txt beside NAME.ext, or "" when there is none."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        return ""
    return read_text_file(path, "caption file").strip()


def read_text_file(path: Path, what: str) -> str:
    """A text file's contents as strict UTF-8 (a leading byte-order mark dropped); one sentence for anything wrong."""
    check_readable(path, what)
    try:
        return path.read_bytes().decode("utf-8-sig")  # strict UTF-8; a leading byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise DiffFitError(
            f"The {what} {path} is not UTF-8 text (byte {exc.start} is invalid).", hint="Save it as UTF-8."
        ) from None
    except OSError as exc:
        raise DiffFitError(f"Cannot read the {what} {path} ({exc.strerror or exc}).") from None


# -- metadata.jsonl / metadata.csv ------------------------------------------------------------------


def metadata_captions(
    folder: ImageFolder, caption_column: str | None = None
) -> tuple[dict[Path, str], dict[Path, Path]]:
    """{normalised image path: caption} from every metadata file above the folder's images, nearest last, and
    {normalised image path: the metadata file its caption came from}."""
    captions: dict[Path, str] = {}
    sources: dict[Path, Path] = {}
    for path in metadata_files(folder):
        listed = read_metadata(path, caption_column)
        captions.update(listed)
        sources.update(dict.fromkeys(listed, path))
    return captions, sources


def outside_of(path: Path, root: Path) -> bool:
    """Whether the file `path` (links followed) lies outside the folder `root`: a caption read from elsewhere."""
    return not path.resolve().is_relative_to(root.resolve())


def metadata_files(folder: ImageFolder) -> list[Path]:
    """The metadata files in the root and in every folder between it and an image, shallowest first.

    Only folders holding images (and their parents) are looked at, so this costs a few stats per
    folder, not a walk of the whole tree.
    """
    root = Path(os.path.normpath(folder.root))
    dirs = set()
    for item in folder.files:
        parent = Path(os.path.normpath(item)).parent
        while parent not in dirs and (parent == root or root in parent.parents):
            dirs.add(parent)
            parent = parent.parent
    found = []
    for here in sorted(dirs, key=lambda d: (len(d.parts), d)):
        if has_marker(here):
            continue
        present = [here / name for name in METADATA_NAMES if (here / name).is_file()]
        if len(present) > 1:
            raise DiffFitError(f"{here} holds both {' and '.join(METADATA_NAMES)}; keep one of them.")
        found += present
    return found


def read_metadata(path: Path, caption_column: str | None = None) -> dict[Path, str]:
    """{normalised image path: caption} of one metadata file; empty captions are left out."""
    rows, columns = _metadata_rows(path)
    if "file_name" not in columns:
        raise DiffFitError(
            f"{path} has no file_name column; its columns: {', '.join(columns) or 'none'}.",
            hint="List each image as file_name (relative to this file's folder) and its caption.",
        )
    column = _text_column(path, rows, columns, caption_column)
    captions: dict[Path, str] = {}
    lines: dict[Path, int] = {}
    missing = []
    for line, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise DiffFitError(f"{path} line {line}: file_name is {name!r}, not a file name.")
        image = _normal(path.parent / name)
        if image in lines:
            raise DiffFitError(
                f"{path} lists {name} twice (lines {lines[image]} and {line}); give one caption per image."
            )
        lines[image] = line
        if not image.is_file():
            missing.append(name)
            continue
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise DiffFitError(f"{path} line {line}: {column} is {type(value).__name__} {value!r}, not text.")
        if value and value.strip():
            captions[image] = value.strip()
    if missing:
        raise DiffFitError(
            f"{path} names {len(missing)} file(s) that do not exist: {_some(missing)}.",
            hint="file_name is relative to the folder of the metadata file.",
        )
    return captions


def _metadata_rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """([(line number, row)], columns in order of appearance) of a .jsonl or .csv metadata file."""
    text = read_text_file(path, "metadata file")
    if path.suffix == ".csv":
        # A file object, not lines: a quoted caption may hold a newline, and str.splitlines would also cut at
        # characters such as \x1e or U+2028 that are text inside a caption.
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c for c in reader.fieldnames or [] if c]
        try:
            return [(reader.line_num, row) for row in reader], columns
        except csv.Error as exc:
            raise DiffFitError(f"{path} line {reader.line_num} is not valid CSV ({exc}).") from None
    rows, columns = [], {}
    for line, row in _json_lines(path, text):
        rows.append((line, row))
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    # Lines end at "\n" only (JSON Lines): U+2028, U+0085 and the like are valid inside a JSON string.
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except ValueError as exc:
            raise DiffFitError(f"{path} line {line} is not valid JSON ({exc}).") from None
        if not isinstance(row, dict):
            raise DiffFitError(f'{path} line {line} is not a JSON object ({{"file_name": ..., "text": ...}}).')
        yield line, row


def _text_column(path: Path, rows: list[tuple[int, dict]], columns: list[str], caption_column: str | None) -> str:
    """--caption-column, else `text`, else `caption`, else the only string column."""
    if caption_column is not None:
        if caption_column not in columns:
            raise DiffFitError(
                f"{path} has no column {caption_column!r} (--caption-column); its columns: {', '.join(columns)}."
            )
        return caption_column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    strings = [c for c in columns if c != "file_name" and _is_text(row.get(c) for _, row in rows)]
    if len(strings) == 1:
        return strings[0]
    raise DiffFitError(
        f"{path} has no text column to caption from ({' or '.join(TEXT_COLUMNS)}, or a single "
        f"column of text); its columns: {', '.join(columns)}.",
        hint="Name one with --caption-column.",
    )


def _is_text(values) -> bool:
    """A column of text: every value a string (or empty), at least one of them not a number (CSV has only strings)."""
    present = [v for v in values if v is not None and v != ""]
    return bool(present) and all(isinstance(v, str) for v in present) and not all(map(_is_number, present))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normal(path: Path) -> Path:
    """One spelling per file for matching metadata names with scanned paths ("a/./b.png" is "a/b.png")."""
    return Path(os.path.normpath(path))


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
