"""Where DiffFit's scale factors gamma sit in a family's blocks, as data, and the one code that adds, finds and
folds them for every family.

gamma scales the output features of a Linear projection in a block: the last projection of each residual
branch (`--gamma-placement branch`, the paper's), plus the attention's input projections for `branch+attn`.
A site holds gamma one of two ways:
- on the projection itself (`slot` None), a `ScaledLinear` (scaled_linear.py): the diffusers families;
- in a Parameter of the block at `slot` (DiT's reference layout: `gamma_attn`, `attn.gamma_qkv`, ...), which
  the block's forward multiplies in after that projection.
Either way gamma folds into the projection (W' = diag(gamma) W, b' = gamma * b).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from difffit.engine.models.scaled_linear import ScaledLinear, fold_scaled_linears, has_gamma

Setter = Callable[[object, str, object], None]
PLACEMENTS = ("branch", "branch+attn")


@dataclass(frozen=True)
class GammaSite:
    projection: str  # the Linear (a path inside a block) whose output features gamma scales and folds into
    slot: str | None = None  # the block's attribute holding gamma as a Parameter; None: on the projection


@dataclass(frozen=True)
class GammaPlacement:
    """Per block list (the ModuleLists holding the blocks, in the order the image passes through them): the
    sites of `branch`, and the sites `branch+attn` adds."""

    branch: dict[str, tuple[GammaSite, ...]]
    attention: dict[str, tuple[GammaSite, ...]] = field(default_factory=dict)

    @classmethod
    def on_projections(
        cls, branch: dict[str, tuple[str, ...]], attention: dict[str, tuple[str, ...]]
    ) -> GammaPlacement:
        """gamma on the projections themselves (ScaledLinear), named by their paths."""

        def sites(paths: dict[str, tuple[str, ...]]) -> dict[str, tuple[GammaSite, ...]]:
            return {blocks: tuple(GammaSite(path) for path in each) for blocks, each in paths.items()}

        return cls(sites(branch), sites(attention))

    @property
    def block_lists(self) -> tuple[str, ...]:
        return tuple(self.branch)

    def sites(self, block_list: str, placement: str) -> tuple[GammaSite, ...]:
        extra = self.attention.get(block_list, ()) if placement == "branch+attn" else ()
        return self.branch[block_list] + extra

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(block list, block) of every block of `model`, in the order the image passes through them."""
        return [(name, block) for name in self.block_lists for block in getattr(model, name)]

    def add(self, model: nn.Module, blocks: list[int], placement: str, setter: Setter = setattr) -> None:
        """gamma (ones: the output is unchanged until trained) at every site of `blocks` that has none yet;
        `setter` lets AdapterSwapper remember what it replaced."""
        every = self.blocks(model)
        for i in blocks:
            kind, block = every[i]
            for site in self.sites(kind, placement):
                owner, leaf, linear = module_at(block, site.projection)
                if not isinstance(linear, nn.Linear):  # SD3's last block has no context output
                    continue
                if site.slot is None:
                    if not has_gamma(linear):
                        setter(owner, leaf, ScaledLinear(linear))
                    continue
                holder, name, current = module_at(block, site.slot)
                if current is None:
                    ones = torch.ones(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
                    setter(holder, name, nn.Parameter(ones))

    def blocks_with_gamma(self, model: nn.Module) -> list[int]:
        return [
            i
            for i, (kind, block) in enumerate(self.blocks(model))
            if any(_gamma_of(block, site) is not None for site in self.sites(kind, "branch+attn"))
        ]

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Fold every gamma into its projection and drop it: slots in place, in site order (a projection under
        two slots, DiT's attn.proj, takes its branch gamma first); ScaledLinears become plain Linears."""
        for kind, block in self.blocks(model):
            slotted = [site for site in self.sites(kind, "branch+attn") if site.slot is not None]
            for site in slotted:
                gamma, linear = _gamma_of(block, site), module_at(block, site.projection)[2]
                if gamma is not None:
                    linear.weight.mul_(gamma.to(linear.weight.dtype)[:, None])
                    linear.bias.mul_(gamma.to(linear.bias.dtype))
            for site in slotted:
                holder, name, _ = module_at(block, site.slot)
                setattr(holder, name, None)
        if any(site.slot is None for sites in self.branch.values() for site in sites):
            fold_scaled_linears(model)


def module_at(block: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module | nn.Parameter | None]:
    """(owner, attribute, value) of `path` inside `block`; value None where the block has no such layer (SD3's
    last block has no context output, a block without dual attention no attn2) or the slot is empty."""
    parent, _, leaf = path.rpartition(".")  # FLUX's single blocks: proj_out, on the block itself
    try:
        owner = block.get_submodule(parent)
    except AttributeError:
        return block, leaf, None
    return owner, leaf, getattr(owner, leaf, None)


def _gamma_of(block: nn.Module, site: GammaSite) -> nn.Parameter | None:
    if site.slot is not None:
        return module_at(block, site.slot)[2]
    module = module_at(block, site.projection)[2]
    return module.gamma_ if module is not None and has_gamma(module) else None
