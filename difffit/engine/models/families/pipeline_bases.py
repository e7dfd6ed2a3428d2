"""Bases that are diffusers pipelines (PixArt, SD3, FLUX): a Hub id, a local folder, or an alias.

`tiny-t2i` names the pipeline folder bundled under difffit/assets/tiny-t2i (a tiny Stable Diffusion 3 trained
on drawn scenes, rebuilt by examples/make_tiny_t2i_base.py); it loads as any local pipeline folder does.

A pipeline base is diffusers' own transformer plus the pipeline's other components (text encoders and
tokenizers, VAE, scheduler), read where the pipeline keeps them. Each family describes its pipelines with
a `PipelineKind` (transformer class, pipeline classes, aliases and their published configs); loading,
fingerprints and finding components are the same for all of them and live here once.

Hub repos are read through the Hugging Face cache, a component at a time when first needed (a 9 GB text
encoder only when captions or prompts must be encoded). A gated repo whose licence the user has not
accepted is one sentence naming the page to accept it on (engine/hub.py).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary, hub_snapshot
from difffit.engine.io import files_signature
from difffit.engine.models.bases import state_dict_fingerprint
from difffit.engine.models.family import BaseSpec
from difffit.engine.models.vae import Autoencoder, load_vae, vae_geometry
from difffit.engine.progress import library_bars_off

# What a repo's snapshot needs before any weights: every component's config, the tokenizers whole.
CONFIG_FILES = [
    "model_index.json",
    "transformer/config.json",
    "scheduler/*",
    "vae/config.json",
    "tokenizer*/*",
    "text_encoder*/config.json",
    "text_encoder*/*.index*.json",
]
TEXT_PARTS = ("tokenizer", "text_encoder")  # the folders whose files identify a pipeline's text encoding
TINY_T2I = "tiny-t2i"  # the text-to-image base bundled with difffit
TINY_T2I_BASE = Path(__file__).resolve().parents[3] / "assets" / "tiny-t2i"


@dataclass(frozen=True)
class Alias:
    transformer: str  # the Hub repo holding transformer/
    components: str  # the Hub repo holding the other components (the same repo for SD3 and FLUX)
    pipeline: str
    license: str = "other"  # the Hub license id of the transformer's repo ("other": a license of its own)
    license_name: str | None = None  # the name that repo gives a license of its own (its card's license_name)


@dataclass(frozen=True)
class PipelineKind:
    """What one family's pipelines look like: its transformer and pipeline classes and its aliases, each
    with the transformer config its repo publishes (so `info` counts without downloading)."""

    family: str
    title: str
    transformer_class: str
    pipelines: tuple[str, ...]
    aliases: dict[str, Alias]
    alias_configs: dict[str, dict]
    is_transformer: Callable[[dict], bool]
    base_class: type  # the PipelineBase subclass the family's bases are
    long_text_tokenizer: str  # the (T5) tokenizer's component name, whose length --max-text-tokens sets


@dataclass
class Components:
    """Where a pipeline's components are: a local folder (a pipeline folder or a Hub snapshot), and for
    a Hub repo its id, so that a component not yet downloaded is fetched when first asked for."""

    folder: Path
    repo_id: str | None = None

    def path(self, name: str, what: str) -> Path:
        """The folder of component `name` (text_encoder, tokenizer_2, vae, scheduler, ...), fetched if needed."""
        here = self.folder / name
        if self.repo_id is not None and not _component_complete(here):
            fetch = {"what": f"{what} of {self.repo_id}", "instead": "pass --base a local pipeline folder"}
            self.folder = hub_snapshot(self.repo_id, CONFIG_FILES, **fetch)
            here = self.folder / name
            patterns = [f"{name}/*"]
            if name.startswith("text_encoder") and any(here.glob("*.index.fp16.json")):
                patterns = [f"{name}/*.json", f"{name}/*.fp16*.safetensors"]  # half the bytes of fp32
            hub_snapshot(self.repo_id, patterns, **fetch)
        if not _component_complete(here):
            raise DiffFitError(
                f"The base's pipeline {self.repo_id or self.folder} has no {name} ({here} is missing "
                "or has no weights); difffit needs the whole pipeline.",
                hint="Pass a folder written by the pipeline's save_pretrained, or a Hub id.",
            )
        return here

    def names(self) -> list[str]:
        """The pipeline's components other than the transformer, as its model_index.json lists them."""
        index = read_json(self.folder / "model_index.json")
        return [
            name
            for name, value in index.items()
            if not name.startswith("_")
            and name != "transformer"
            and isinstance(value, list)
            and value
            and value[0] is not None
        ]

    def library_class(self, name: str) -> str:
        """The class model_index.json names for component `name` (e.g. CLIPTextModelWithProjection)."""
        return read_json(self.folder / "model_index.json")[name][1]

    @property
    def vae_spec(self) -> str:
        return f"{self.repo_id}/vae" if self.repo_id is not None else str((self.folder / "vae").resolve())

    def encoder_identity(self) -> str:
        """What identifies the text encoders without loading them: a Hub repo at its snapshot (commit), or the
        local folder's tokenizer and encoder files (names, sizes, mtimes)."""
        if self.repo_id is not None:
            return f"{self.repo_id}@{self.folder.name}"
        files = sorted(
            f
            for part in TEXT_PARTS
            for folder in sorted(self.folder.glob(f"{part}*"))
            for f in folder.rglob("*")
            if f.is_file()
        )
        return f"{self.folder.resolve()}\n{files_signature(files, self.folder)}"


def _component_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file() and not (folder / "scheduler_config.json").is_file():
        return folder.name.startswith("tokenizer") and any(folder.glob("tokenizer*"))
    needs_weights = folder.name.startswith("text_encoder") or folder.name == "vae"
    return not needs_weights or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


@dataclass
class PipelineBase:
    """A loaded pipeline base: diffusers' transformer (CPU, fp32, eval mode) and where its pipeline lives."""

    model: torch.nn.Module
    spec: str
    source_format: str  # "diffusers" (a local folder), "bundled" (tiny-t2i), "hub", "config" (weights not read)
    fingerprint: str | None
    components: Components
    pipeline: str  # the diffusers pipeline class, e.g. PixArtAlphaPipeline, StableDiffusion3Pipeline
    hub_id: str | None = None  # the transformer's Hub repo, for model cards
    stored_dtype: str = "float32"  # the transformer file's dtype: merge writes the merged weights in it
    text_tokens: int | None = None  # an applied adapter's --max-text-tokens (None: the pipeline's own)
    tokenizer_tokens: int | None = None  # the long-text tokenizer's model_max_length, where it is local and set
    family: str = ""
    class_names: None = None
    _vae: Autoencoder | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def vae_spec(self) -> str:
        return self.components.vae_spec

    @property
    def vae_factor(self) -> int:
        if self.source_format == "config":  # not downloaded: every public pipeline's VAE is 8x
            return 8
        return vae_geometry(self.vae_spec)[0]

    @property
    def resolution(self) -> int:
        """The image side the transformer was trained at (its pipeline's default size)."""
        return self.model.config.sample_size * self.vae_factor

    @property
    def max_text_tokens(self) -> int:
        """The caption tokens the model reads: an applied adapter's, else the pipeline's own default."""
        return self.text_tokens or self.tokenizer_capped(pipeline_default(self.pipeline, "max_sequence_length"))

    def tokenizer_capped(self, tokens: int) -> int:
        """`tokens`, or fewer where the long-text tokenizer is made for fewer (its model_max_length): the bundled
        tiny-t2i's T5 reads 16 tokens, and padding its captions to SD3's 256 would only cost time."""
        return min(tokens, self.tokenizer_tokens or tokens)

    def vae(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
        if self._vae is None:
            self.components.path("vae", "the VAE")
            self._vae = load_vae(self.vae_spec, device, dtype)
        return self._vae.to(device, dtype)

    def check_components(self) -> None:
        """A local pipeline folder missing a component is named now; a Hub repo's come when first needed."""
        if self.components.repo_id is None:
            for name in self.components.names():
                self.components.path(name, f"the {name}")

    def scheduler_config(self) -> dict:
        path = self.components.path("scheduler", "the scheduler") / "scheduler_config.json"
        return read_json(path)


def pipeline_default(pipeline: str, argument: str) -> Any:
    """A default of the pipeline's __call__ (max_sequence_length, guidance_scale, num_inference_steps)."""
    import diffusers

    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters[argument].default


def read_json(path: Path) -> dict:
    """A pipeline's JSON file (model_index.json, a config.json), which must hold one JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise DiffFitError(f"Could not read {path} ({error_summary(e)}).") from None
    if not isinstance(value, dict):
        raise DiffFitError(
            f"{path} holds a JSON {type(value).__name__}, not the object of names a pipeline writes; "
            "it is damaged or not a diffusers file."
        )
    return value


def check_model_index(path: Path, index: dict) -> None:
    """Refuse a model_index.json whose components are not listed as diffusers writes them: [library, class] each
    (or null), so that a damaged one is one sentence rather than an error deep in loading."""
    for name, value in index.items():
        # settings beside the components are any JSON but a string or a list (DiTPipeline's id2label)
        if name.startswith("_") or value is None or isinstance(value, dict | bool | int | float):
            continue
        if not (isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
            raise DiffFitError(
                f"{path} lists the component {name} as {value!r}, not as [library, class]; it is "
                "damaged or not a diffusers pipeline."
            )


# Sizes the families compute with: a transformer config must give each as a positive whole number.
SHAPE_KEYS = ("sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "in_channels")


def check_transformer_config(path: Path, config: dict, kind: PipelineKind) -> None:
    """Refuse a transformer config.json whose values are not of the types its diffusers class takes (the types of
    the class's defaults), so a damaged file is one sentence rather than a TypeError deep in the model."""
    import diffusers

    parameters = inspect.signature(getattr(diffusers, kind.transformer_class).__init__).parameters
    for name, parameter in parameters.items():
        if name not in config:
            continue
        default, value = parameter.default, config[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, int):
            whole = isinstance(value, int) and not isinstance(value, bool)
            fits = (whole and value >= 1) if name in SHAPE_KEYS else (whole and value >= 0) or value is None
        elif isinstance(default, float):
            fits = number
        elif isinstance(default, str):
            fits = isinstance(value, str) or value is None
        elif isinstance(default, tuple):
            fits = isinstance(value, list | tuple)
        else:
            fits = True
        if not fits:
            wanted = "a positive whole number" if name in SHAPE_KEYS else f"a {type(default).__name__}"
            raise DiffFitError(
                f"{path} gives {name} as {value!r}, and a {kind.transformer_class} takes {wanted}; the "
                "file is damaged or not a transformer config."
            )


def pipeline_class_of(folder: Path) -> str | None:
    """The pipeline class a local folder's model_index.json names (None without one)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    pipeline = read_json(index).get("_class_name")
    return pipeline if isinstance(pipeline, str) else None


def load_pipeline_base(base: BaseSpec, kind: PipelineKind, *, weights: bool = True) -> PipelineBase:
    """A resolved alias, local pipeline folder or Hub pipeline id of `kind`. `weights=False` builds the
    transformer on the meta device from its config (info's counts; an alias needs no download for it)."""
    spec = base.spec
    if base.source == "alias":
        alias = kind.aliases[spec]
        transformer = _snapshot(alias.transformer, spec, weights, optional=not weights)
        if transformer is None:  # an alias not in the cache, for info: its published config
            return _config_only(spec, kind.alias_configs[spec], alias, kind)
        components = Components(
            _snapshot(alias.components, spec, False, optional=not weights) or Path(), alias.components
        )
        return _load(
            spec, transformer / "transformer", components, alias.pipeline, "hub", alias.transformer, weights, kind
        )
    if base.source in ("folder", "bundled"):  # a local folder, or one bundled with difffit (`tiny-t2i`)
        pipeline = pipeline_class_of(base.path)
        if pipeline not in kind.pipelines:
            raise DiffFitError(
                f"{base.path} is not a {kind.title} pipeline folder (model_index.json names {pipeline})."
            )
        return _load(
            spec,
            base.path / "transformer",
            Components(base.path),
            pipeline,
            "bundled" if base.source == "bundled" else "diffusers",
            None,
            weights,
            kind,
        )
    folder = _snapshot(base.repo_id, spec, weights)
    return _load(
        spec,
        folder / "transformer",
        Components(folder, base.repo_id),
        pipeline_class_of(folder),
        "hub",
        base.repo_id,
        weights,
        kind,
    )


def bundled_folder(spec: str) -> Path:
    """The pipeline folder a bundled base's alias names (only `tiny-t2i` so far), refused when this build of
    difffit does not ship it."""
    if not (TINY_T2I_BASE / "model_index.json").is_file():
        raise DiffFitError(
            f"The tiny text-to-image base is not bundled in this build of difffit (nothing at {TINY_T2I_BASE}).",
            hint="Rebuild it with `python examples/make_tiny_t2i_base.py` "
            "from a source checkout, or pass --base a text-to-image pipeline (a Hub id or a folder).",
        )
    return TINY_T2I_BASE


def _snapshot(repo_id: str, spec: str, weights: bool, optional: bool = False) -> Path | None:
    """A Hub repo's snapshot with its configs, and its transformer weights if `weights`. Not cached and
    not downloadable: None if `optional`, else the one-sentence error."""
    files = CONFIG_FILES + (["transformer/*"] if weights else [])
    try:
        return hub_snapshot(
            repo_id, files, what=f"the base {spec} (Hub repo {repo_id})", instead="pass --base a local pipeline folder"
        )
    except DiffFitError:
        if optional:
            return None
        raise


def _transformer_class(kind: PipelineKind):
    import diffusers

    return getattr(diffusers, kind.transformer_class)


def _config_only(
    spec: str, config: dict, alias: Alias, kind: PipelineKind, tokenizer_tokens: int | None = None
) -> PipelineBase:
    with torch.device("meta"):
        model = _transformer_class(kind)(**config)
    return kind.base_class(
        model.eval(),
        spec,
        "config",
        None,
        Components(Path(), alias.components),
        alias.pipeline,
        alias.transformer,
        family=kind.family,
        tokenizer_tokens=tokenizer_tokens,
    )


def _load(
    spec: str,
    transformer_dir: Path,
    components: Components,
    pipeline: str,
    source_format: str,
    hub_id: str | None,
    weights: bool,
    kind: PipelineKind,
) -> PipelineBase:
    config = read_json(transformer_dir / "config.json") if (transformer_dir / "config.json").is_file() else {}
    if not kind.is_transformer(config):
        raise DiffFitError(
            f"{spec}: {transformer_dir} does not hold a {kind.title} transformer "
            f"({config.get('_class_name', 'no config.json')})."
        )
    check_transformer_config(transformer_dir / "config.json", config, kind)
    if not weights:
        return _config_only(
            spec,
            {k: v for k, v in config.items() if not k.startswith("_")},
            Alias(hub_id or spec, components.repo_id or spec, pipeline),
            kind,
            _tokenizer_length(components.folder / kind.long_text_tokenizer),
        )
    try:
        with library_bars_off():
            model = _transformer_class(kind).from_pretrained(transformer_dir, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError) as e:
        raise DiffFitError(
            f"Could not load the {kind.title} transformer of {spec} from {transformer_dir} ({error_summary(e)})."
        ) from None
    model.eval().requires_grad_(True)
    return kind.base_class(
        model,
        spec,
        source_format,
        state_dict_fingerprint(model.state_dict()),
        components,
        pipeline,
        hub_id,
        _stored_dtype(transformer_dir),
        family=kind.family,
        tokenizer_tokens=_tokenizer_length(components.folder / kind.long_text_tokenizer),
    )


def _tokenizer_length(folder: Path) -> int | None:
    """A local tokenizer's model_max_length; None where its config is absent (not downloaded) or leaves it unset
    (transformers then writes a huge sentinel)."""
    path = folder / "tokenizer_config.json"
    length = read_json(path).get("model_max_length") if path.is_file() else None
    return length if isinstance(length, int) and 0 < length < 1_000_000 else None


def _stored_dtype(transformer_dir: Path) -> str:
    """The dtype of the transformer's weight file, read from its safetensors header."""
    from safetensors import safe_open

    files = sorted(transformer_dir.glob("*.safetensors"))
    if not files:
        return "float32"
    with safe_open(str(files[0]), "pt") as f:
        first = next(iter(f.keys()), None)
        stored = f.get_slice(first).get_dtype() if first else "F32"
    return {"F16": "float16", "BF16": "bfloat16"}.get(stored, "float32")
