"""PixArt-α/Σ bases: diffusers pipelines (a Hub id, a local folder with model_index.json, or an alias).

A PixArt base is diffusers' own `PixArtTransformer2DModel` plus the pipeline's other components (T5
text encoder and tokenizer, VAE, scheduler), read where the pipeline keeps them. The public Σ repos
and the α 256 repo hold only a transformer; their aliases take the other components from the repo
the PixArt team publishes them in, as diffusers' documentation does. Nothing is re-implemented:
the transformer, VAE, scheduler and pipeline classes are diffusers', the encoder is transformers' T5.

Hub repos are read through the Hugging Face cache, a component at a time when first needed (the
9 GB text encoder only when captions or prompts must be encoded).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.hub import error_summary, hub_ref, hub_snapshot
from difffit_cli.engine.io import files_signature
from difffit_cli.engine.models.bases import state_dict_fingerprint
from difffit_cli.engine.models.vae import Autoencoder, load_vae, vae_geometry
from difffit_cli.engine.progress import library_bars_off

PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # α repos still say the latter
SIGMA_COMPONENTS = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


@dataclass(frozen=True)
class Alias:
    transformer: str  # the Hub repo holding transformer/
    components: str  # the Hub repo holding text_encoder/, tokenizer/, vae/, scheduler/
    pipeline: str


ALIASES = {
    "PixArt-alpha-256": Alias("PixArt-alpha/PixArt-XL-2-256x256", "PixArt-alpha/PixArt-XL-2-512x512",
                              "PixArtAlphaPipeline"),
    "PixArt-alpha-512": Alias("PixArt-alpha/PixArt-XL-2-512x512", "PixArt-alpha/PixArt-XL-2-512x512",
                              "PixArtAlphaPipeline"),
    "PixArt-alpha-1024": Alias("PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha/PixArt-XL-2-1024-MS",
                               "PixArtAlphaPipeline"),
    "PixArt-Sigma-512": Alias("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", SIGMA_COMPONENTS, "PixArtSigmaPipeline"),
    "PixArt-Sigma-1024": Alias("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", SIGMA_COMPONENTS, "PixArtSigmaPipeline"),
}
# The XL/2 transformer as the public repos configure it (transformer/config.json), so `info` can count
# what each method trains without downloading anything. Per alias: sample_size (latent side) and the
# 1024-MS α model's resolution and aspect-ratio embedders (use_additional_conditions).
XL2_CONFIG = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72, "attention_type": "default",
    "caption_channels": 4096, "cross_attention_dim": 1152, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 8, "patch_size": 2,
    "upcast_attention": False,
}
ALIAS_CONFIGS = {
    "PixArt-alpha-256": {"sample_size": 32, "use_additional_conditions": False},
    "PixArt-alpha-512": {"sample_size": 64, "use_additional_conditions": False},
    "PixArt-alpha-1024": {"sample_size": 128, "use_additional_conditions": True},
    "PixArt-Sigma-512": {"sample_size": 64, "use_additional_conditions": False},
    "PixArt-Sigma-1024": {"sample_size": 128, "use_additional_conditions": False, "interpolation_scale": 2},
}
CONFIG_FILES = ["model_index.json", "transformer/config.json", "scheduler/*", "vae/config.json",
                "tokenizer/*", "text_encoder/config.json", "text_encoder/*.index*.json"]


@dataclass
class Components:
    """Where a pipeline's components are: a local folder (a pipeline folder or a Hub snapshot), and for
    a Hub repo its id, so that a component not yet downloaded is fetched when first asked for."""

    folder: Path
    repo_id: str | None = None

    def path(self, name: str, what: str) -> Path:
        """The folder of component `name` (text_encoder, tokenizer, vae, scheduler), fetched if needed."""
        here = self.folder / name
        if self.repo_id is not None and not _component_complete(here):
            fetch = {"what": f"{what} of {self.repo_id}", "instead": "pass --base a local pipeline folder"}
            self.folder = hub_snapshot(self.repo_id, CONFIG_FILES, **fetch)
            here = self.folder / name
            patterns = [f"{name}/*"]
            if name == "text_encoder" and any(here.glob("*.index.fp16.json")):
                patterns = [f"{name}/*.json", f"{name}/*.fp16*.safetensors"]  # half the bytes of fp32
            hub_snapshot(self.repo_id, patterns, **fetch)
        if not _component_complete(here):
            raise DiffFitError(f"The base's pipeline {self.repo_id or self.folder} has no {name} ({here} is missing "
                               "or has no weights); difffit needs the whole pipeline.",
                               hint="Pass a folder written by the pipeline's save_pretrained, or a Hub id.")
        return here

    @property
    def vae_spec(self) -> str:
        return f"{self.repo_id}/vae" if self.repo_id is not None else str((self.folder / "vae").resolve())

    def encoder_identity(self) -> str:
        """What identifies the text encoder without loading it: a Hub repo at its snapshot (commit), or the
        local folder's tokenizer and encoder files (names, sizes, mtimes)."""
        if self.repo_id is not None:
            return f"{self.repo_id}@{self.folder.name}"
        files = sorted(f for name in ("tokenizer", "text_encoder") for f in (self.folder / name).rglob("*")
                       if f.is_file())
        return f"{self.folder.resolve()}\n{files_signature(files, self.folder)}"


def _component_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file() and not (folder / "scheduler_config.json").is_file():
        return folder.name == "tokenizer" and any(folder.glob("tokenizer*"))
    needs_weights = folder.name in ("text_encoder", "vae")
    return not needs_weights or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


@dataclass
class PixArtBase:
    """A loaded PixArt base: diffusers' transformer (CPU, fp32, eval mode) and where its pipeline lives."""

    model: torch.nn.Module
    spec: str
    source_format: str  # "diffusers" (a local folder), "hub", or "config" (weights not read: info only)
    fingerprint: str | None
    components: Components
    pipeline: str  # the diffusers pipeline class: PixArtAlphaPipeline or PixArtSigmaPipeline
    hub_id: str | None = None  # the transformer's Hub repo, for model cards
    stored_dtype: str = "float32"  # the transformer file's dtype: merge writes the merged weights in it
    text_tokens: int | None = None  # an applied adapter's --max-text-tokens (None: the pipeline's own)
    family: str = "pixart"
    class_names: None = None
    _vae: Autoencoder | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def vae_spec(self) -> str:
        return self.components.vae_spec

    @property
    def vae_factor(self) -> int:
        if self.source_format == "config":  # not downloaded: the public pipelines' VAEs (SD, SDXL) are 8x
            return 8
        return vae_geometry(self.vae_spec)[0]

    @property
    def resolution(self) -> int:
        return self.model.config.sample_size * self.vae_factor

    @property
    def max_text_tokens(self) -> int:
        """The caption tokens the model reads: an applied adapter's, else the pipeline's own default (120
        for α, 300 for Σ)."""
        return self.text_tokens or pipeline_default(self.pipeline, "max_sequence_length")

    def vae(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
        if self._vae is None:
            self.components.path("vae", "the VAE")
            self._vae = load_vae(self.vae_spec, device, dtype)
        return self._vae.to(device, dtype)

    def check_components(self) -> None:
        """A local pipeline folder missing a component is named now; a Hub repo's come when first needed."""
        if self.components.repo_id is None:
            for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
                self.components.path(name, f"the {name}")

    def scheduler_config(self) -> dict:
        path = self.components.path("scheduler", "the scheduler") / "scheduler_config.json"
        return read_json(path)


def pipeline_default(pipeline: str, argument: str):
    """A default of the pipeline's __call__ (max_sequence_length, guidance_scale, num_inference_steps)."""
    import diffusers

    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters[argument].default


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffFitError(f"Could not read {path} ({error_summary(e)}).") from None


def pipeline_class_of(folder: Path) -> str | None:
    """The pipeline class a local folder's model_index.json names (None without one)."""
    index = folder / "model_index.json"
    return read_json(index).get("_class_name") if index.is_file() else None


def is_pixart_transformer(config: dict) -> bool:
    return config.get("_class_name") in TRANSFORMER_CLASSES and config.get("norm_type") == "ada_norm_single"


def load_pixart_base(spec: str, *, weights: bool = True) -> PixArtBase:
    """An alias, a local pipeline folder or a Hub pipeline id. `weights=False` builds the transformer on
    the meta device from its config (info's counts; an alias needs no download for it)."""
    if spec in ALIASES:
        alias = ALIASES[spec]
        transformer = _snapshot(alias.transformer, spec, weights, optional=not weights)
        if transformer is None:  # an alias not in the cache, for info: its published config
            return _config_only(spec, {**XL2_CONFIG, **ALIAS_CONFIGS[spec]}, alias)
        components = Components(_snapshot(alias.components, spec, False, optional=not weights) or Path(),
                                alias.components)
        return _load(spec, transformer / "transformer", components, alias.pipeline, "hub", alias.transformer,
                     weights)
    path = Path(spec).expanduser()
    if path.is_dir():
        pipeline = pipeline_class_of(path)
        if pipeline not in PIPELINES:
            raise DiffFitError(f"{path} is not a PixArt pipeline folder (model_index.json names {pipeline}).")
        return _load(spec, path / "transformer", Components(path), pipeline, "diffusers", None, weights)
    repo_id = hub_ref(spec).repo_id  # family_of_spec matched it as a Hub repo
    folder = _snapshot(repo_id, spec, weights)
    return _load(spec, folder / "transformer", Components(folder, repo_id), pipeline_class_of(folder), "hub",
                 repo_id, weights)


def _snapshot(repo_id: str, spec: str, weights: bool, optional: bool = False) -> Path | None:
    """A Hub repo's snapshot with its configs, and its transformer weights if `weights`. Not cached and
    not downloadable: None if `optional`, else the one-sentence error."""
    files = CONFIG_FILES + (["transformer/*"] if weights else [])
    try:
        return hub_snapshot(repo_id, files, what=f"the base {spec} (Hub repo {repo_id})",
                            instead="pass --base a local pipeline folder")
    except DiffFitError:
        if optional:
            return None
        raise


def _config_only(spec: str, config: dict, alias: Alias) -> PixArtBase:
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel(**config)
    return PixArtBase(model.eval(), spec, "config", None, Components(Path(), alias.components), alias.pipeline,
                      alias.transformer)


def _load(spec: str, transformer_dir: Path, components: Components, pipeline: str, source_format: str,
          hub_id: str | None, weights: bool) -> PixArtBase:
    from diffusers import PixArtTransformer2DModel

    config = read_json(transformer_dir / "config.json") if (transformer_dir / "config.json").is_file() else {}
    if not is_pixart_transformer(config):
        raise DiffFitError(f"{spec}: {transformer_dir} does not hold a PixArt transformer "
                           f"({config.get('_class_name', 'no config.json')}).")
    if not weights:
        return _config_only(spec, {k: v for k, v in config.items() if not k.startswith("_")},
                            Alias(hub_id or spec, components.repo_id or spec, pipeline))
    try:
        with library_bars_off():
            model = PixArtTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffFitError(f"Could not load the PixArt transformer of {spec} from {transformer_dir} "
                           f"({error_summary(e)}).") from None
    model.eval().requires_grad_(True)
    return PixArtBase(model, spec, source_format, state_dict_fingerprint(model.state_dict()), components, pipeline,
                      hub_id, _stored_dtype(transformer_dir))


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
