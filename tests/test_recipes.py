"""Recipes: shipped files parse, unknown keys are refused, CLI > recipe > resumed config > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from difffit.engine.errors import DiffFitError
from difffit.engine.training.config import FitConfig
from difffit.engine.training.recipes import SHIPPED, read_options, resolve_fit_config, write_toml

PAPER_DATASETS = (
    "food101",
    "sun397",
    "df20m-mini",
    "caltech101",
    "cub200",
    "artbench10",
    "flowers102",
    "stanford-cars",
)


@pytest.mark.parametrize("name", PAPER_DATASETS)
def test_shipped_paper_recipes(name):
    config = resolve_fit_config({}, name)
    assert (config.base, config.resolution, config.lr, config.batch_size, config.steps) == (
        "DiT-XL/2-256",
        256,
        1e-3,
        32,
        24000,
    )
    assert config.method == "difffit" and config.data and config.out == f"runs/{name}-difffit"
    assert "Data: http" in (SHIPPED / f"{name}.toml").read_text()  # says where to get the data


def test_cli_beats_recipe_beats_defaults(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "imgs"\nsteps = 100\nbatch-size = 8\nlr = 5e-4\nema = false\n')
    config = resolve_fit_config({"steps": 7, "ema": True}, str(recipe))
    assert (config.data, config.steps, config.batch_size, config.lr, config.ema) == ("imgs", 7, 8, 5e-4, True)
    assert config.seed == FitConfig().seed  # neither given: the default


def test_cli_detects_given_options(tmp_path, monkeypatch):
    """Through the real CLI: an option left at its default must not override the recipe."""
    import difffit.engine.training.train as train
    from difffit import cli

    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "imgs"\nbase = "random:DiT-S/2"\nsteps = 100\nbatch_size = 8\nsave_every = 5\n')
    seen = {}

    def fake_fit(config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(train, "fit", fake_fit)
    result = CliRunner().invoke(cli.app, ["fit", "--recipe", str(recipe), "--steps", "24000", "--no-ema"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    # --steps given with the default's value still wins; batch_size and save_every come from the recipe.
    assert (config.steps, config.batch_size, config.save_every, config.ema) == (24000, 8, 5, False)
    assert config.data == "imgs" and config.base == "random:DiT-S/2"


def test_unknown_or_mistyped_recipe_key_is_one_sentence(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("stepz = 10\n")
    with pytest.raises(DiffFitError, match="unknown option `stepz`"):
        read_options(recipe)
    recipe.write_text('steps = "many"\n')
    with pytest.raises(DiffFitError, match="`steps` should be an integer"):
        read_options(recipe)
    with pytest.raises(DiffFitError, match="not found"):
        resolve_fit_config({}, str(tmp_path / "missing.toml"))


def test_resume_reads_the_runs_config_below_recipe_and_cli(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(write_toml({"data": "imgs", "steps": 20, "lr": 0.002, "seed": 3}))
    config = resolve_fit_config({"out": str(out), "resume": True, "steps": 40})
    assert (config.data, config.steps, config.lr, config.seed) == ("imgs", 40, 0.002, 3)


def test_toml_writer_round_trips():
    values = {
        "s": 'a "quoted"\\ path\nnext\tline é',
        "i": 3,
        "f": 1e-3,
        "b": False,
        "l": [1, 2],
        "none": None,
        "p": Path("/x/y"),
    }
    parsed = tomllib.loads(write_toml(values, header="test"))
    assert parsed == {"s": values["s"], "i": 3, "f": 1e-3, "b": False, "l": [1, 2], "p": "/x/y"}


def test_caption_options_from_the_cli_and_recipes(tmp_path, monkeypatch):
    """Declared on fit, carried into FitConfig and recipes, checked before any work."""
    import difffit.engine.training.train as train
    from difffit import cli

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'data = "imgs"\nbase = "b"\ncaption-dropout = 0\nmax_text_tokens = 77\n'
        'caption_template = "a photo of {class}"\n'
    )
    seen = {}

    def fake_fit(config, **kwargs):
        seen["config"] = config.validate()
        raise SystemExit(0)

    monkeypatch.setattr(train, "fit", fake_fit)
    result = CliRunner().invoke(cli.app, ["fit", "--recipe", str(recipe), "--caption-column", "prompt"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.caption_column, config.caption_template, config.caption_dropout, config.max_text_tokens) == (
        "prompt",
        "a photo of {class}",
        0.0,
        77,
    )
    assert FitConfig().caption_dropout is None and FitConfig().max_text_tokens is None  # the base's family's
    for args, words in (
        (["--caption-dropout", "1"], "--caption-dropout must be in [0, 1)"),
        (["--caption-dropout", "nan"], "--caption-dropout must be in [0, 1)"),
        (["--max-text-tokens", "0"], "--max-text-tokens must be 1 or more"),
        (["--caption-template", "a photo"], "has no {class} placeholder"),
    ):
        result = CliRunner().invoke(cli.app, ["fit", "--recipe", str(recipe), *args])
        assert isinstance(result.exception, DiffFitError) and words in str(result.exception), args


def test_method_settings_are_flat_keys_in_recipes_and_in_the_resolved_config(tmp_path):
    """The config nests them as one MethodSettings; a recipe, the flags and config.toml keep them flat."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "imgs"\nmethod = "lora"\nrank = 16\nlora-targets = "qkv, proj"\nadapter_dim = 32\n')
    config = resolve_fit_config({"prompt_tokens": 4}, str(recipe))
    settings = config.method_settings
    assert (settings.rank, settings.lora_targets, settings.adapter_dim, settings.prompt_tokens) == (
        16,
        ("qkv", "proj"),
        32,
        4,
    )
    assert settings.gamma_placement == FitConfig().method_settings.gamma_placement  # not given: the default
    written = tmp_path / "config.toml"
    written.write_text(write_toml({k: v for k, v in config.options().items() if k != "resume"}))  # as fit writes it
    text = written.read_text()
    assert "rank = 16\n" in text and 'lora_targets = "qkv,proj"\n' in text and "method_settings" not in text
    assert FitConfig.from_options(read_options(written)) == config  # a resumed run reads it back
    for text, refusal in (
        ('rank = "many"\n', "`rank` should be an integer"),
        ("lora_targets = 3\n", "`lora_targets` should be a comma-separated string"),
        ("[method_settings]\nrank = 4\n", "unknown option `method_settings`"),
    ):
        written.write_text(text)
        with pytest.raises(DiffFitError, match=refusal):
            read_options(written)
