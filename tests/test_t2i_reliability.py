"""Text-to-image runs on tiny PixArt, SD3 and FLUX pipelines: `merge --overwrite` keeps a user's files, a resume
of a changed run is refused naming the change, and the commands print no library notice meant for developers
(one difffit line for cut captions instead of transformers' "Token indices sequence length" notice)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings

import pytest
from conftest import run_cli
from t2i_fixtures import (
    PIPELINES,
    make_captioned_data,
    save_tiny_clip,
    t2i_fit_config,
)

from difffit.engine.errors import DiffFitError
from difffit.engine.training.train import fit

LONG = "a red square " + "with a long story about its edges and its corners " * 30  # past every tokenizer
# What reaches stderr only from a library: transformers' and diffusers' notices, Python warnings, tqdm bars.
LIBRARY_NOISE = re.compile(
    r"Token indices|\[transformers\]|\[diffusers\]|Warning: (?!\d+ (caption|prompt))|"
    r"[A-Za-z]+Warning\b|deprecat|it/s\]|s/it\]|Loading (weights|checkpoint|pipeline)|"
    r"Writing model shards|Fetching \d+ files",
    re.IGNORECASE,
)


@pytest.fixture(params=list(PIPELINES), scope="module")
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def setup(family, tmp_path_factory):
    """A tiny pipeline whose tokenizers admit 16 tokens (transformers' notice fires past that), captioned data
    with two captions past every limit, and a 2-step LoRA run with a checkpoint per step."""
    root = tmp_path_factory.mktemp(f"{family}-reliability")
    pipe = PIPELINES[family](root / "pipe")
    for config in pipe.glob("tokenizer*/tokenizer_config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 16}))
    data = make_captioned_data(root / "data", per_caption=2)
    (root / "private.txt").write_text("a blue square from my private notes\n")
    (data / "blue-0.txt").unlink()
    (data / "blue-0.txt").symlink_to(root / "private.txt")  # a caption read from outside the data folder
    (data / "red-0.txt").write_text(LONG)
    (data / "blue-1.txt").write_text(LONG.replace("red", "blue"))
    run = root / "run"
    fit(
        t2i_fit_config(data, pipe, root, steps=2, batch_size=2, method="lora", save_every=1, out=str(run)),
        progress=False,
    )
    return pipe, data, run


def test_merge_overwrite_keeps_the_files_a_user_added(setup, tmp_path):
    pipe, _, run = setup
    from difffit.engine.methods.merge import merge_adapter

    for fmt in ("diffusers", "peft"):
        out = tmp_path / fmt
        merge_adapter(str(run / "adapter.safetensors"), out, fmt=fmt)
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        (out / "NOTES.md").write_text("my notes")
        (out / "my-extras").mkdir()
        (out / "my-extras" / "eval.json").write_text('{"fid": 1.0}')
        merge_adapter(str(run / "adapter.safetensors"), out, fmt=fmt, overwrite=True)
        assert (out / "NOTES.md").read_text() == "my notes"
        assert (out / "my-extras" / "eval.json").read_text() == '{"fid": 1.0}'
        now = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert now == sorted([*written, "NOTES.md", "my-extras/eval.json"])


@pytest.mark.parametrize("change", ["caption", "added image", "resolution", "batch", "rank"])
def test_resume_of_a_changed_run_is_refused_naming_the_change(setup, tmp_path, change):
    pipe, data, run = setup
    data, run = shutil.copytree(data, tmp_path / "data"), shutil.copytree(run, tmp_path / "run")
    overrides = {"resolution": {"resolution": 32}, "batch": {"batch_size": 4}, "rank": {"rank": 4}}.get(change, {})
    if change == "caption":
        (data / "blue-0.txt").write_text("a green square\n")
    elif change == "added image":
        shutil.copy(data / "blue-0.png", data / "blue-9.png")
        shutil.copy(data / "blue-0.txt", data / "blue-9.txt")
    config = t2i_fit_config(
        data, pipe, tmp_path, steps=3, batch_size=2, method="lora", save_every=1, out=str(run), resume=True
    )
    config = type(config).from_options({**config.options(), **overrides})
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(DiffFitError) as refused:
        fit(config, progress=False)
    said = str(refused.value)
    words = {
        "caption": "the captions changed",
        "added image": "the training images changed (4 then, 5 now)",
        "resolution": "--resolution was 16, now 32",
        "batch": "--batch-size was 2, now 4",
        "rank": "--rank was 8, now 4",
    }[change]
    assert words in said and said.count(".") == 1 + said.count("..."), said
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_larger_steps_resumes_with_the_base_and_data_moved(setup, tmp_path):
    pipe, data, run = setup
    run = shutil.copytree(run, tmp_path / "run")
    pipe, data = shutil.copytree(pipe, tmp_path / "pipe"), shutil.copytree(data, tmp_path / "data")
    resumed = fit(
        t2i_fit_config(
            data,
            pipe,
            tmp_path,
            steps=3,
            batch_size=2,
            method="lora",
            save_every=1,
            out=str(run),
            resume=True,
            num_workers=0,
            compile="off",
        ),
        progress=False,
    )
    assert (resumed.start_step, resumed.step) == (2, 3)


class _Notices(logging.Handler):
    """What transformers' and diffusers' loggers emit (their handlers write to the stderr of the moment they were
    made, which capsys does not see)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(f"{record.name}: {record.getMessage()}")


def _quiet_cli(monkeypatch, capsys, *args) -> str:
    """Run the command; its stderr, checked to hold no library notice, nor a warning Python shows a user (its
    default filters hide DeprecationWarning outside __main__), nor a library logger's warning."""
    notices, loggers = _Notices(), [logging.getLogger(name) for name in ("transformers", "diffusers")]
    for logger in loggers:
        logger.addHandler(notices)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli(monkeypatch, capsys, *args)
    finally:
        for logger in loggers:
            logger.removeHandler(notices)
    assert code == 0, err
    assert not LIBRARY_NOISE.search(err), err
    assert not notices.seen, notices.seen
    shown = [
        w
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning))
    ]
    assert not shown, [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in shown]
    return err


def test_commands_print_no_library_notices(setup, family, tmp_path, monkeypatch, capsys):
    pipe, data, _ = setup
    run = tmp_path / "run"
    err = _quiet_cli(
        monkeypatch,
        capsys,
        "fit",
        data,
        "--base",
        pipe,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
        "--compile",
        "off",
        "--out",
        run,
        "--cache-dir",
        tmp_path / "cache",
        "--num-workers",
        "0",
    )
    flat = err.replace("\n", " ")
    # The setup's T5 tokenizer admits 16 tokens, which caps the pipeline's default (PixArt-alpha 120, SD3 256,
    # FLUX 512): the two long captions and the 28-token private one are cut, in one difffit line.
    assert "3 captions are longer than 16 tokens; their ends are cut" in flat, err
    assert flat.count("longer than") == 1, err
    adapter = run / "adapter.safetensors"
    _quiet_cli(
        monkeypatch,
        capsys,
        "sample",
        adapter,
        "--prompt",
        LONG,
        "-n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "samples",
    )
    _quiet_cli(monkeypatch, capsys, "merge", adapter, "--out", tmp_path / "merged")
    clip = save_tiny_clip(tmp_path / "clip")
    capsys.readouterr()  # the fixture's own saving bars
    _quiet_cli(
        monkeypatch,
        capsys,
        "eval-fid",
        tmp_path / "samples",
        "--metrics",
        "clip",
        "--clip-model",
        clip,
        "--device",
        "cpu",
    )


def test_push_names_the_prompts_its_card_quotes_and_those_from_outside_the_data(setup, tmp_path, monkeypatch, capsys):
    _, data, run = setup
    code, _, err = run_cli(
        monkeypatch, capsys, "push", run / "adapter.safetensors", "me/squares", "--dry-run", "--out", tmp_path / "up"
    )
    assert code == 0, err
    flat = " ".join(err.split())
    card = (tmp_path / "up" / "README.md").read_text()
    assert "a blue square from my private notes" in card  # what the warning is about
    assert "The model card quotes 4 preview prompt(s): 'a blue square from my private notes'; " in flat, err
    assert (
        f"Warning: the preview prompt 'a blue square from my private notes' is the caption file "
        f"{data / 'blue-0.txt'}, outside the data folder"
    ) in flat, err
    assert flat.count("Warning: the preview prompt") == 1, err


def test_dit_commands_print_no_library_notices(toy_data, tiny_base_file, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _quiet_cli(
        monkeypatch,
        capsys,
        "fit",
        toy_data,
        "--base",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--compile",
        "off",
        "--out",
        run,
        "--num-workers",
        "0",
        "--cache-dir",
        tmp_path / "cache",
    )
    adapter = run / "adapter.safetensors"
    _quiet_cli(
        monkeypatch,
        capsys,
        "sample",
        adapter,
        "-n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "samples",
    )
    _quiet_cli(monkeypatch, capsys, "merge", adapter, "--out", tmp_path / "merged.safetensors")
