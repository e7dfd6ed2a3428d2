"""The adapter file: the trained tensors of a DiffFit run plus JSON metadata, in one .safetensors.

Storage: an fp16 adapter (the default) stores each tensor as its difference from the base (gamma
as gamma - 1, whose base value is 1; the tensors LoRA, adapters and prompts add as they are), so
fp16 rounding is relative to the change, not the weight, and an untouched tensor is stored as
exact zeros and reproduces the base bit for bit. An fp32 adapter stores the trained values as they
are, so applying it reproduces the trained model exactly. A new class table (its shape differs
from the base's) is always stored as values.

Which tensors a file must hold follows from its metadata (method, its settings, gamma blocks, class
table), so a missing or extra tensor is caught on read, before anything touches a model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from difffit import __version__
from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary
from difffit.engine.io import atomic_path, check_readable
from difffit.engine.methods.baselines import add_method_modules
from difffit.engine.methods.settings import MethodSettings
from difffit.engine.methods.trainable import CLASS_TABLE, prepare_model, trainable_parameters
from difffit.engine.models.dit import DiTConfig
from difffit.engine.models.families import family_named, family_of
from difffit.engine.models.family import Family, added_reference
from difffit.engine.models.formats import damaged_file, read_safetensors_header

if TYPE_CHECKING:
    from difffit.engine.models.bases import Base

FORMAT = "difffit-adapter"
VERSION = 1
METADATA_KEY = "difffit"
# Bounds on the metadata JSON an adapter may carry: far above what fit writes (a config, class names, a training
# summary: kilobytes, a few levels deep), and checked before parsing.
MAX_METADATA_CHARS = 16_000_000
MAX_METADATA_DEPTH = 64
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DERIVED = ("architecture", "num_classes", "null_index", "latent_size", "resolution", "pos_embed_scale")


@dataclass
class AdapterMeta:
    """Everything needed to rebuild the trained model from its base, stored as JSON in the file."""

    method: str
    gamma_blocks: list[int]
    base_spec: str
    base_fingerprint: str
    base_config: dict  # the base model's config as loaded (DiT: classes, latent size) -- what the fingerprint covers
    config: dict  # the adapted model's config (DiT: new classes, new resolution)
    vae_spec: str
    vae_factor: int = 8
    new_class_table: bool = False
    class_names: list[str] | None = None
    pos_embed: str = "standard"  # "standard", or upscale-res's "trick" / "plain"
    training: dict = field(default_factory=dict)  # steps, batch_size, lr, seed, last_loss, ...
    settings: dict = field(default_factory=dict)  # the method's settings (MethodSettings.for_method)
    storage: str = "delta"  # "delta" (fp16 default) or "values" (fp32); set by save_adapter
    dtype: str = "fp16"
    family: str = "dit"  # the model family (engine/models/families); files from before families are DiT's
    checksum: str | None = None  # of the stored tensors (tensors_checksum), set by save_adapter; older files: None
    difffit_version: str = __version__
    format: str = FORMAT
    version: int = VERSION

    @property
    def model_family(self) -> Family:
        return family_named(self.family)

    @property
    def architecture(self) -> str:
        return self.model_family.architecture(self.config)

    @property
    def num_classes(self) -> int | None:
        return self.config.get("num_classes")  # None: a text-conditional family

    @property
    def null_index(self) -> int | None:
        return self.num_classes

    @property
    def latent_size(self) -> int:
        """The latent side it trained at (FLUX's config has none of its own), else its config's."""
        trained = self.training.get("resolution")
        return trained // self.vae_factor if trained else self.model_family.latent_size(self.config)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_factor

    @property
    def pos_embed_scale(self) -> float | None:
        return self.config.get("pos_embed_scale")

    @property
    def method_settings(self) -> MethodSettings:
        return MethodSettings.from_dict(self.settings)

    def to_dict(self) -> dict:
        """The stored fields plus the derived ones (architecture, resolution, ...) for readers and --json."""
        out = dataclasses.asdict(self)
        for name in DERIVED:
            out[name] = getattr(self, name)
        return out


def make_meta(
    base: Base,
    model: nn.Module,
    method: str,
    *,
    new_class_table: bool = False,
    class_names: Sequence[str] | None = None,
    training: dict | None = None,
    pos_embed: str = "standard",
    base_config: DiTConfig | dict | None = None,
    settings: MethodSettings | None = None,
) -> AdapterMeta:
    """Metadata for `model`, prepared by `prepare_model` from `base`. Pass `base_config` when the base's
    model was changed in place since loading (upscale-res moves it to a new resolution)."""
    family = family_of(model)
    if base_config is None:
        base_config = family.config_of(base.model)
    return AdapterMeta(
        method=method,
        gamma_blocks=family.gamma_blocks(model),
        base_spec=base.spec,
        base_fingerprint=base.fingerprint,
        base_config=base_config.to_dict() if isinstance(base_config, DiTConfig) else dict(base_config),
        config=family.config_of(model),
        vae_spec=base.vae_spec,
        vae_factor=base.vae_factor,
        new_class_table=new_class_table,
        class_names=list(class_names) if class_names is not None else None,
        pos_embed=pos_embed,
        training=dict(training or {}),
        settings=(settings or MethodSettings()).for_method(method, family),
        family=family.name,
    )


def expected_shapes(meta: AdapterMeta) -> dict[str, torch.Size]:
    """The tensors an adapter with this metadata holds, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = meta.model_family.empty_model(meta.base_config)
        prepare_model(
            model,
            meta.method,
            meta.gamma_blocks,
            meta.num_classes,
            new_classes=meta.new_class_table,
            settings=meta.method_settings,
        )
    return {name: p.shape for name, p in trainable_parameters(model).items()}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def save_adapter(
    path: str | Path, model: nn.Module, base_state: dict[str, torch.Tensor], meta: AdapterMeta, dtype: str = "fp16"
) -> None:
    """Write the trained tensors of `model` (those `meta` names) to `path`, atomically."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise DiffFitError(f"Unknown adapter dtype {dtype!r}; choose fp16 or fp32.")
    meta = dataclasses.replace(meta, dtype=dtype, storage="delta" if dtype == "fp16" else "values")
    state = model.state_dict()
    tensors = {}
    for name in expected_shapes(meta):
        value = state[name].detach().float().cpu()
        if meta.storage == "delta":
            value = value - _reference(name, base_state, value.shape, meta)
        stored = value.to(DTYPES[dtype]).contiguous()
        if not torch.isfinite(stored).all():
            raise DiffFitError(f"Tensor {name} does not fit in {dtype} (overflow or NaN); save with fp32.")
        tensors[name] = stored
    meta = dataclasses.replace(meta, checksum=tensors_checksum(tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta.to_dict())})


def _reference(name: str, base_state: dict[str, torch.Tensor], shape: torch.Size, meta: AdapterMeta) -> torch.Tensor:
    """What a delta is measured from: an added tensor's base value (1 for gamma, else 0), the base's
    tensor, or 0 for a new class table."""
    if (added := added_reference(name)) is not None:
        return torch.full(shape, added)
    if name == CLASS_TABLE and meta.new_class_table:
        return torch.zeros(shape)
    return base_state[name].detach().float().cpu()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def is_adapter_file(path: str | Path) -> bool:
    """True for a file whose safetensors header says it is a difffit adapter (any version)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return METADATA_KEY in read_safetensors_header(path)[1]
    except DiffFitError:
        return False


def read_adapter(path: str | Path, *, allow_non_finite: bool = False) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Tensors and metadata of an adapter; one-sentence DiffFitError for anything wrong with the file.

    Tensors holding NaN or inf are refused (they would sample black images), unless `allow_non_finite`
    (`info` reads such a file to flag it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta = read_adapter_meta(path)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise damaged_file(path, error_summary(exc)) from None
    expected = expected_shapes(meta)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = "; ".join(
            f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra))
            if names
        )
        raise DiffFitError(f"{path} does not hold the tensors its metadata ({meta.method}) describes: {what}.")
    if bad := [n for n in expected if tensors[n].shape != expected[n]]:
        raise DiffFitError(
            f"{path}: tensor {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, expected {tuple(expected[bad[0]])}."
        )
    if meta.checksum is not None and meta.checksum != tensors_checksum(tensors):
        raise DiffFitError(
            f"{path} is corrupt: its tensors do not match the checksum its metadata records.",
            hint="Copy it again from where it came from, or re-train it.",
        )
    if not allow_non_finite and (broken := non_finite_tensors(tensors)):
        raise DiffFitError(
            f"{path} holds NaN or inf values (in {', '.join(broken[:3])}); it cannot be used.",
            hint="Re-train it, or use an earlier checkpoint's adapter.",
        )
    return tensors, meta


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of every tensor's name, dtype, shape and bytes, in name order: bytes changed anywhere in the
    file's tensor data are caught on read (zlib's CRC-32 runs at about 2 GB/s: benchmarks/adapter_checksum.py)."""
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"{name}:{tensor.dtype}:{tuple(tensors[name].shape)};".encode(), crc)
        crc = zlib.crc32(tensor.view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


def refuse_run_folder(path: str | Path) -> None:
    """A `fit` run folder given where its adapter is meant: say which file to give instead."""
    path = Path(path)
    if path.is_dir() and (path / "adapter.safetensors").is_file() and not (path / "model_index.json").exists():
        raise DiffFitError(
            f"{path} is a training run folder, not a model.", hint=f"Use {path / 'adapter.safetensors'}."
        )


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or inf."""
    return sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())


def check_metadata_shape(path: Path, text: str) -> None:
    """Refuse metadata larger or more deeply nested than any adapter's, before it is parsed (a parser recurses once
    per level): in one sentence, not a RecursionError."""
    if len(text) > MAX_METADATA_CHARS:
        raise DiffFitError(
            f"{path} has {len(text):,} characters of adapter metadata, more than the "
            f"{MAX_METADATA_CHARS:,} an adapter writes; it is not a difffit adapter."
        )
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_METADATA_DEPTH:
        raise DiffFitError(
            f"{path} has adapter metadata nested {deepest:,} levels deep, more than the "
            f"{MAX_METADATA_DEPTH} an adapter writes; it is not a difffit adapter."
        )


def read_adapter_meta(path: str | Path) -> AdapterMeta:
    """An adapter's metadata, from the file header only (no tensors read)."""
    path = Path(path)
    refuse_run_folder(path)
    check_readable(path, "adapter file")
    if not path.is_file():
        raise DiffFitError(f"Adapter file {path} does not exist.")
    return _parse_meta(path, read_safetensors_header(path)[1])


def _parse_meta(path: Path, header: dict) -> AdapterMeta:
    try:
        text = header[METADATA_KEY]
        check_metadata_shape(path, text)
        raw = json.loads(text)
    except (KeyError, ValueError, TypeError):
        raise DiffFitError(f"{path} is a safetensors file but not a difffit adapter (no difffit metadata).") from None
    if not isinstance(raw, dict):
        raise DiffFitError(f"{path} has adapter metadata that is not a JSON object; it is not a difffit adapter.")
    if raw.get("format") != FORMAT:
        raise DiffFitError(f"{path} has format {raw.get('format')!r}, not {FORMAT!r}; it is not a difffit adapter.")
    if raw.get("version") != VERSION:
        raise DiffFitError(
            f"{path} is adapter format version {raw.get('version')}, but difffit {__version__} reads version "
            f"{VERSION}; use the difffit version that wrote it ({raw.get('difffit_version', 'unknown')})."
        )
    known = {f.name for f in dataclasses.fields(AdapterMeta)}
    try:
        meta = AdapterMeta(**{k: v for k, v in raw.items() if k in known})
        for config in (meta.config, meta.base_config):
            meta.model_family.check_config(config)
    except (TypeError, ValueError) as exc:
        raise DiffFitError(f"{path} has incomplete adapter metadata ({exc}); re-save the adapter.") from None
    if meta.storage not in ("delta", "values"):
        raise DiffFitError(f"{path} has unknown tensor storage {meta.storage!r}.")
    return meta


# ---------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------


class AdapterSwapper:
    """Apply adapters to one loaded base and take them off again, in milliseconds.

    `apply` replaces the touched Parameter objects (and DiT's pos_embed and class table, gamma) with new
    ones, adds the modules its method adds (LoRA layers, adapters, prompts) and keeps every original;
    `restore` puts the originals back, so the base is bit-identical afterwards, whatever the method,
    and nothing of the base is ever copied.
    """

    def __init__(self, base: Base | nn.Module, spec: str | None = None):
        """`base`: a loaded base, or a model alone (a stock diffusers transformer) named `spec` in messages."""
        self.model: nn.Module = base if isinstance(base, nn.Module) else base.model
        self.spec = spec or getattr(base, "spec", type(self.model).__name__)
        self._saved: list[tuple[nn.Module, str, object]] = []
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def replace(self, owner: object, name: str, value: object) -> None:
        """Set `owner.name` to `value`, remembering what it was for `restore` (a `Setter`)."""
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    @torch.no_grad()
    def apply(self, tensors: dict[str, torch.Tensor], meta: AdapterMeta, dtype: torch.dtype | None = None) -> None:
        """Apply an adapter (restoring any applied one first); its tensors take `dtype` (default: the model's)."""
        self.restore()
        model = self.model
        check_base_architecture(meta, model, self.spec)
        like = next(model.parameters())
        dtype = dtype or like.dtype
        try:
            # The base takes the adapted model's shape (DiT: resolution, class table; PixArt: gamma modules).
            family_of(model).shape_for_adapter(model, meta, self.replace)
            # peft marks the base's parameters frozen when it injects LoRA: remember the flags too.
            self._flags = [(p, p.requires_grad) for p in model.parameters()]
            with torch.random.fork_rng(devices=[]):  # the modules' random init is overwritten below
                add_method_modules(model, meta.method, meta.method_settings, self.replace)
            for name, stored in tensors.items():
                module_name, _, leaf = name.rpartition(".")  # PixArt's final scale_shift_table has no module
                module = model.get_submodule(module_name)
                value = _decode(name, stored.to(like.device), getattr(module, leaf), meta)
                self.replace(module, leaf, nn.Parameter(value.to(like.device, dtype), requires_grad=False))
        except Exception:
            self.restore()
            raise

    @torch.no_grad()
    def cast_like_replaced(self) -> None:
        """Give every tensor set since `apply` the dtype of the base tensor it replaced (after an `apply` in
        float32 and a fold, which round once)."""
        for owner, name, old in self._saved:
            new = getattr(owner, name)
            if isinstance(old, torch.Tensor) and isinstance(new, nn.Parameter) and new.dtype != old.dtype:
                setattr(owner, name, nn.Parameter(new.to(old.dtype), requires_grad=new.requires_grad))

    def restore(self) -> None:
        """Put the base's own tensors back (a no-op when nothing is applied)."""
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._saved, self._flags = [], []


def check_base_architecture(meta: AdapterMeta, model: nn.Module, spec: str) -> None:
    """Refuse a base of another family, or one whose shapes the adapter's tensors do not fit, naming both."""
    family = family_of(model)
    if family.name != meta.family:
        raise DiffFitError(
            f"The adapter was trained on a {meta.model_family.title} base ({meta.base_spec}), and "
            f"{spec} is a {family.title} model.",
            hint=f"Use the adapter with its base, {meta.base_spec}.",
        )
    if not family.fits_adapter(model, meta):
        raise DiffFitError(
            f"The adapter needs a {family.architecture(meta.base_config)} base (it was trained on "
            f"{meta.base_spec}), but {spec} is a {family.architecture(family.config_of(model))}: the "
            "adapter's base differs.",
            hint=f"Pass --base {meta.base_spec}, or a copy of it.",
        )


def _decode(name: str, stored: torch.Tensor, current: torch.Tensor | None, meta: AdapterMeta) -> torch.Tensor:
    """The trained value of one tensor, computed in fp32."""
    stored = stored.float()
    if meta.storage == "values" or (name == CLASS_TABLE and meta.new_class_table):
        return stored
    if (added := added_reference(name)) is not None:  # gamma is stored as gamma - 1
        return stored + added
    if current.shape != stored.shape:
        raise DiffFitError(f"The adapter's {name} has shape {tuple(stored.shape)}, the base's {tuple(current.shape)}.")
    base = current.detach().float()
    # Where the delta is zero keep the base's bits exactly (x + 0.0 would turn -0.0 into +0.0).
    return torch.where(stored == 0, base, base + stored)
