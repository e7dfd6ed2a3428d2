"""Every option's default is written once, in the engine's options dataclass, and each command reads it there.

Per command: the default that click applies and --help shows is the engine's, and the signature names the
engine's field (`steps: opt.FitSteps = opt.FIT.steps`): a literal copy agrees today and drifts later, and a
neighbour's field (`rank = opt.METHOD.prompt_tokens`, both 8) agrees by chance. Fit's options and the
config's fields are the same set, so a new field cannot lack its flag, nor a flag its field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest
import typer

from difffit.cli import _options as opt
from difffit.cli import app, evaluate, generate, train
from difffit.cli import inspect as info_cli
from difffit.engine.evaluation.options import EvalConfig, SamplingFields
from difffit.engine.methods.settings import MethodSettings
from difffit.engine.training.options import FitFields, option_fields


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


FIT_OWN = names(FitFields) - {"method_settings"}
# command: (its function, [(the expression its defaults read, the defaults, the fields read there)] in order of
# precedence, the parameters named other than their field)
SOURCES = {
    "fit": (
        train.fit,
        [("opt.METHOD", opt.METHOD, names(MethodSettings)), ("opt.FIT", opt.FIT, FIT_OWN)],
        train.RENAMED,
    ),
    "upscale-res": (
        train.fit,
        [("opt.METHOD", opt.METHOD, names(MethodSettings)), ("opt.FIT", opt.FIT, FIT_OWN)],
        train.RENAMED,
    ),
    "info": (info_cli.info, [("opt.METHOD", opt.METHOD, names(MethodSettings))], {}),
    "sample": (generate.sample, [("opt.SAMPLE", opt.SAMPLE, names(SamplingFields))], {}),
    # eval-fid's --batch-size and --device are the evaluation's (and its sampling's too)
    "eval-fid": (
        evaluate.eval_fid,
        [("opt.EVAL", opt.EVAL, names(EvalConfig)), ("opt.FID", opt.FID, names(SamplingFields))],
        {},
    ),
}
COMMANDS = typer.main.get_command(app).commands


def source_of(command: str, parameter: str) -> tuple[str, object, str] | None:
    """(expression, defaults, field) that `parameter` of `command` takes its default from; None: no field."""
    _, sources, renamed = SOURCES[command]
    field = renamed.get(parameter, parameter)
    return next(((expr, defaults, field) for expr, defaults, fields in sources if field in fields), None)


def signature_defaults(function) -> dict[str, ast.expr]:
    """Each parameter's default as written in the source."""
    args = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].args
    return {a.arg: d for a, d in zip(args.args[len(args.args) - len(args.defaults) :], args.defaults, strict=True)}


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_every_default_the_command_shows_is_the_engines(command):
    checked = 0
    for param in COMMANDS[command].params:
        if (source := source_of(command, param.name)) is None:
            continue
        _, defaults, field = source
        assert param.default == getattr(defaults, field), f"{command} {param.opts[0]}"
        checked += 1
    assert checked >= 6, "the walk found the command's options"


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_the_signature_names_the_engines_field_instead_of_a_literal(command):
    wrong = []
    for name, default in signature_defaults(SOURCES[command][0]).items():
        if (source := source_of(command, name)) is None:
            continue
        expr, _, field = source
        if ast.unparse(default) != f"{expr}.{field}":
            wrong.append(f"{name} = {ast.unparse(default)} (should be {expr}.{field})")
    assert wrong == []


def test_fit_has_a_flag_for_every_config_field_and_a_field_for_every_flag():
    flags = {train.RENAMED.get(p.name, p.name) for command in ("fit", "upscale-res") for p in COMMANDS[command].params}
    assert flags - {"recipe", "as_json"} == set(option_fields())
    # Each setting is declared once: the config nests the method settings instead of repeating them.
    assert not FIT_OWN & names(MethodSettings)


def test_each_options_dataclass_is_a_commands_options():
    params = {command: {p.name for p in COMMANDS[command].params} for command in COMMANDS}
    assert names(MethodSettings) <= params["info"]
    assert names(SamplingFields) <= params["sample"]
    # --cfg-scale, --scheduler ... make `sampling`; --prompts FILE (prompts_file) makes `prompts`
    assert names(EvalConfig) - {"sampling", "prompts"} <= params["eval-fid"]
