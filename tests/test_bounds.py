"""Bounded sizes, counts and seeds (issue 28, items 1-3): what a command cannot do is refused in one sentence
before anything is allocated for it, and what it accepts runs in bounded memory.

The walk over every integer option of every command (read from the Typer app, so a new option is walked too)
runs each with a huge value in a child process whose memory is capped (tests/bounded_cli.py): an unbounded
allocation there is a memory error, which fails the test as surely as a traceback or a hang."""

from __future__ import annotations

import json

import pytest
import typer.main
from bounded_cli import cli_run, refused_in_one_sentence, run_bounded
from t2i_fixtures import PIPELINES, make_captioned_data, make_tiny_pixart

from difffit.cli import app
from difffit.engine.errors import MAX_SEED, DiffFitError
from difffit.engine.evaluation.options import MAX_IMAGES
from difffit.engine.evaluation.sample import SamplingOptions, sample_seed
from difffit.engine.models.family import MAX_SIDE

HUGE = 2**64  # past every bound: sizes, counts and the seeds a generator takes
METHOD_OF = {"--rank": "lora", "--adapter-dim": "adapter-parallel", "--prompt-tokens": "vpt-deep"}


def integer_options(command: str) -> list[str]:
    """The flags of `command` that take a whole number, as the app declares them."""
    click_command = typer.main.get_command(app).commands[command]
    return [
        param.opts[0]
        for param in click_command.params
        if param.param_type_name == "option" and param.type_descriptor.annotation is int
    ]


def with_value(argv: list[str], flag: str, value) -> list[str]:
    """`argv` with `flag` set to `value` (replacing the flag's value there, if any)."""
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = str(value)
        return argv
    return [*argv, flag, str(value)]


@pytest.fixture(scope="module")
def walk_inputs(tmp_path_factory, tiny_base_file, tiny_vae_dir):
    from conftest import make_toy_data

    root = tmp_path_factory.mktemp("walk")
    data = make_toy_data(root / "data")
    tiny = ["--base", str(tiny_base_file), "--vae", str(tiny_vae_dir)]
    quick_fit = [
        "--method",
        "difffit",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--save-every",
        "0",
        "--sample-every",
        "0",
        "--num-workers",
        "0",
        "--cache-dir",
        str(root / "cache"),
        "--no-ema",
        "--adapter-dtype",
        "fp32",
        "--compile",
        "off",
    ]
    return root, {
        # command -> a valid, quick command line of it (its --out, if it has one, is added per case)
        "fit": ["fit", str(data), *tiny, *quick_fit],
        "upscale-res": ["upscale-res", str(data), *tiny, "--to", "32", *quick_fit],
        "sample": [
            "sample",
            str(tiny_base_file),
            "--vae",
            str(tiny_vae_dir),
            "-n",
            "1",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
        ],
        "eval-fid": [
            "eval-fid",
            str(data / "red"),
            str(data / "blue"),
            "--inception-weights",
            "random",
            "--batch-size",
            "4",
        ],
        "info": ["info", "random:DiT-S/2", "--method", "difffit"],
    }


def test_every_integer_option_of_every_command_is_bounded(walk_inputs):
    root, base_lines = walk_inputs
    commands = typer.main.get_command(app).commands
    cases = []
    for command in commands:
        flags = integer_options(command)
        if flags:
            assert command in base_lines, f"{command} has integer options {flags}: give it a command line above"
        for flag in flags:
            argv = with_value(base_lines[command], flag, HUGE)
            if flag in METHOD_OF and "--method" in argv:  # a method setting, walked with the method that reads it
                argv = with_value(argv, "--method", METHOD_OF[flag])
            if any("--out" in p.opts for p in commands[command].params):
                argv = [*argv, "--out", str(root / f"out-{len(cases)}")]
            cases.append(argv)
    assert len(cases) > 40  # fit's and upscale-res's options are walked, not skipped
    results = run_bounded(cases)
    unbounded = [
        (r["argv"][0], r["argv"][r["argv"].index(str(HUGE)) - 1], r["err"][-400:] or r["timed_out"])
        for r in results
        if r["code"] != 0 and not refused_in_one_sentence(r)
    ]
    assert not unbounded, unbounded
    accepted = {r["argv"][r["argv"].index(str(HUGE)) - 1] for r in results if r["code"] == 0}
    # Accepted only where a huge value means "never" (checkpoints, previews, log lines, warmup) or "keep all", and
    # --num-heads, which a base that records its heads (as these do) does not read.
    assert accepted <= {"--save-every", "--sample-every", "--log-every", "--warmup", "--keep", "--num-heads"}, accepted


# -- sample sizes (item 1), on every text-to-image family -------------------------------------------------


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline(request, tmp_path_factory):
    return PIPELINES[request.param](tmp_path_factory.mktemp(request.param) / "pipe")


def test_sample_refuses_a_side_beyond_what_the_family_draws_before_allocating(pipeline, tmp_path, monkeypatch, capsys):

    from difffit.engine.models.families import load_base

    base = load_base(str(pipeline))
    family = type(base).__name__
    for flag in ("--width", "--height"):
        code, _, err = cli_run(
            monkeypatch,
            capsys,
            "sample",
            pipeline,
            "--prompt",
            "a cat",
            "-n",
            "1",
            flag,
            "65536",
            "--out",
            tmp_path / "out",
        )
        assert code == 1 and f"{flag} must be {MAX_SIDE:,} or less (got 65,536)" in err, (family, err)
    assert not (tmp_path / "out").exists()
    # The family's own largest side, where it has one (SD3's positional table), is refused by the same check.
    from difffit.engine.models.families import family_of

    largest = family_of(base).largest_side(base)
    step = family_of(base).size_multiple(base)
    if largest is not None:
        with pytest.raises(DiffFitError, match=f"above {largest} px, the largest side .* positional table"):
            SamplingOptions(scheduler=None, width=largest + step).for_base(base)
        SamplingOptions(scheduler=None, width=largest).for_base(base)
    with pytest.raises(DiffFitError, match=f"above {min(largest or MAX_SIDE, MAX_SIDE)} px"):
        family_of(base).check_side(base, "--width", MAX_SIDE + step)


# -- counts (item 2) ------------------------------------------------------------------------------------------


def test_sample_counts_are_refused_before_any_source_loads(pipeline, tmp_path, monkeypatch, capsys):

    import difffit.engine.methods.sources as sources

    loaded = []
    monkeypatch.setattr(sources, "iter_sources", lambda *a, **k: loaded.append(1) or iter(()))
    for argv, words in (
        (["-n", str(10**9)], f"-n must be {MAX_IMAGES:,} or less"),
        (["-n", "2", "--batch-size", str(10**6)], "--batch-size must be 1,024 or less"),
    ):
        code, _, err = cli_run(
            monkeypatch, capsys, "sample", pipeline, "--prompt", "a cat", *argv, "--out", tmp_path / "out"
        )
        assert code == 1 and words in err, err
    assert not loaded


def test_fit_bounds_batches_workers_and_eval_count(tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch):
    import os

    from difffit.engine.data.batches import MAX_FORWARD_BATCH, Split
    from difffit.engine.training.config import FitConfig

    options = dict(data=str(toy_data), base=str(tiny_base_file), vae=str(tiny_vae_dir), out=str(tmp_path / "run"))
    with pytest.raises(DiffFitError, match="--num-workers must be .* or less .*CPU cores"):
        FitConfig(**options, num_workers=(os.cpu_count() or 1) + 1).validate()
    with pytest.raises(DiffFitError, match=f"--eval-n must be {MAX_IMAGES:,} or less"):
        FitConfig(**options, eval_n=MAX_IMAGES + 1).validate()
    # One forward pass takes at most MAX_FORWARD_BATCH images: a bigger step is split by --grad-accum, never
    # allocated at once.
    with pytest.raises(DiffFitError, match="micro-batches of 1,000,000 images per process, above 1,024") as refused:
        _ = Split(1_000_000, 1, 0, 1).per_process
    assert "--grad-accum 977" in refused.value.hint
    assert Split(1_000_000, 1000, 0, 1).per_process == 1000
    assert Split(MAX_FORWARD_BATCH * 8, 1, 3, 8).per_process == MAX_FORWARD_BATCH


def test_fit_with_a_huge_batch_and_repeats_is_refused_before_the_first_step(
    tmp_path, toy_data, tiny_base_file, tiny_vae_dir
):
    argv = [
        "fit",
        toy_data,
        "--base",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "--steps",
        "1",
        "--batch-size",
        "1000000",
        "--repeats",
        "625000",
        "--save-every",
        "0",
        "--sample-every",
        "0",
        "--num-workers",
        "0",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    ]
    [result] = run_bounded([argv])
    assert refused_in_one_sentence(result) and "--grad-accum" in result["err"], result
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("pipeline_class, limit", [("PixArtAlphaPipeline", 120), ("PixArtSigmaPipeline", 300)])
def test_pixart_max_text_tokens_is_bounded_by_its_pipeline(pipeline_class, limit, tmp_path):
    from t2i_fixtures import t2i_fit_config

    from difffit.engine.training.train import fit

    pipe = make_tiny_pixart(tmp_path / "pipe", pipeline=pipeline_class)
    data = make_captioned_data(tmp_path / "data", per_caption=2)
    with pytest.raises(
        DiffFitError, match=f"--max-text-tokens {limit + 1} is above {limit}, the most a {pipeline_class} reads"
    ):
        fit(t2i_fit_config(data, pipe, tmp_path, max_text_tokens=limit + 1), progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any caption was encoded


def test_eval_fid_counts_are_refused_up_front(tmp_path, toy_data):
    from difffit.engine.evaluation.metrics import evaluate

    for kwargs, words in (
        ({"num_samples": 10**9}, f"-n must be {MAX_IMAGES:,} or less"),
        ({"batch_size": 10**6}, "--batch-size must be 1,024 or less"),
        ({"metrics": "kid", "kid_subsets": 10**9}, "--kid-subsets must be"),
    ):
        with pytest.raises(DiffFitError, match=words):
            evaluate(
                str(toy_data / "red"), str(toy_data / "blue"), inception_weights="random", progress=False, **kwargs
            )


# -- seeds (item 3) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**32, 2**64, -1, -(2**63)])
def test_seeds_outside_the_generators_range_are_refused_in_every_command(
    seed, tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch, capsys
):

    commands = {
        "sample": ["sample", tiny_base_file, "--vae", tiny_vae_dir, "-n", "1", "--out", tmp_path / "s"],
        "fit": ["fit", toy_data, "--base", tiny_base_file, "--vae", tiny_vae_dir, "--out", tmp_path / "f"],
        "eval-fid": ["eval-fid", tiny_base_file, toy_data, "--vae", tiny_vae_dir, "--inception-weights", "random"],
    }
    for name, argv in commands.items():
        code, _, err = cli_run(monkeypatch, capsys, *argv, "--seed", str(seed))
        assert code == 1 and "--seed must be" in err and "Traceback" not in err, (name, err)
    assert not any((tmp_path / d).exists() for d in ("s", "f"))


def test_the_largest_seed_is_its_own_and_does_not_wrap_to_another():
    # Sample i's generator seed folds (seed, i) into 32 bits: every accepted seed draws its own images.
    assert len({sample_seed(s, 0) for s in (0, 1, MAX_SEED, 2**31)}) == 4
    assert sample_seed(MAX_SEED + 1, 0) == sample_seed(0, 0)  # why larger seeds are refused
    SamplingOptions(seed=MAX_SEED)
    with pytest.raises(DiffFitError, match=f"--seed must be {MAX_SEED:,} or less"):
        SamplingOptions(seed=MAX_SEED + 1)


def test_sample_json_records_the_seed_that_drew_the_images(tmp_path, tiny_base_file, tiny_vae_dir, monkeypatch, capsys):

    code, _, err = cli_run(
        monkeypatch,
        capsys,
        "sample",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "-n",
        "1",
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--seed",
        str(MAX_SEED),
        "--out",
        tmp_path / "s",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["seed"] == MAX_SEED


def test_the_npz_of_a_run_is_written_one_image_at_a_time(tmp_path, tiny_base_file, tiny_vae_dir, monkeypatch, capsys):
    import numpy as np

    from difffit.engine.evaluation import sample_folder

    loaded = []
    real_load = sample_folder.load_pngs
    monkeypatch.setattr(sample_folder, "GRID_MAX", 1)  # the grid reads one image; the npz must read none at once
    monkeypatch.setattr(sample_folder, "load_pngs", lambda paths: loaded.append(len(paths)) or real_load(paths))
    code, _, err = cli_run(
        monkeypatch,
        capsys,
        "sample",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "-n",
        "3",
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--npz",
        "--out",
        tmp_path / "s",
    )
    assert code == 0, err
    assert loaded == [1]
    pngs = real_load([tmp_path / "s" / f"{i:06d}.png" for i in range(3)])
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert list(data.keys()) == ["arr_0"] and np.array_equal(data["arr_0"], pngs)
