"""The DiT model, with the numerics of the reference implementation (facebookresearch/DiT).

One file, the whole model visible at once. Parameter names follow the original checkpoint layout
(`x_embedder.proj`, `blocks.N.attn.qkv`, ...), so an original state dict loads with no renaming.
Differences from the reference are in speed only: attention goes through
`scaled_dot_product_attention`, and blocks can be gradient-checkpointed.

Fine-tuning methods add optional parts, each absent (None) unless a method adds it, so a stock
model has exactly the reference's parameters: DiffFit's per-block scale factors (`gamma_attn`,
`gamma_mlp`, and `attn.gamma_qkv` / `attn.gamma_proj` for the branch+attn placement; the DiT family adds
and folds them, families/dit.py), a bottleneck
adapter beside or after the MLP (`adapter`), and VPT-deep prompt tokens (`prompts`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Standard configurations: (depth, hidden_size, num_heads).
DIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
    "DiT-L": (24, 1024, 16),
    "DiT-XL": (28, 1152, 16),
}
HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_CONFIGS.values()}
CLASS_TABLE = "y_embedder.embedding_table.weight"  # the class table's parameter name


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a DiT; readable off an original state dict's shapes."""

    input_size: int = 32  # latent side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # Positional-embedding grid scale: 1.0 is the standard grid; the DiffFit resolution trick
    # computes a larger grid's positions on a smaller base grid's scale (see resolution.py).
    pos_embed_scale: float = 1.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def name(self) -> str:
        """'DiT-XL/2' for a standard config, else a descriptive name."""
        for name, (depth, hidden, heads) in DIT_CONFIGS.items():
            if (depth, hidden, heads) == (self.depth, self.hidden_size, self.num_heads):
                return f"{name}/{self.patch_size}"
        return f"DiT-d{self.depth}-w{self.hidden_size}-h{self.num_heads}/{self.patch_size}"

    def to_dict(self) -> dict:
        return asdict(self)


def config_for(name: str, **overrides) -> DiTConfig:
    """`config_for("DiT-XL/2", input_size=32)` -> the standard DiT-XL/2 config."""
    try:
        family, patch = name.split("/")
        depth, hidden, heads = DIT_CONFIGS[family]
        patch_size = int(patch)
    except (ValueError, KeyError):
        known = ", ".join(f"{f}/{p}" for f in DIT_CONFIGS for p in (2, 4, 8))
        raise ValueError(f"Unknown DiT config {name!r}; known configs: {known}.") from None
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch_size, **overrides)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image latent -> sequence of patch tokens (a strided conv, as timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # The reference divides by half (=128), not half - 1 as diffusers does; [cos, sin] order.
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the null label used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Label dropout is drawn once per forward (not once per block, as diffusers does).
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3)
        self.proj = nn.Linear(hidden_size, hidden_size)
        # Scale factors on the qkv and proj outputs (DiffFit's "branch+attn" placement).
        self.gamma_qkv: nn.Parameter | None = None
        self.gamma_proj: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)
        if self.gamma_qkv is not None:
            qkv = qkv * self.gamma_qkv
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        if self.gamma_proj is not None:
            x = x * self.gamma_proj
        return x


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Bottleneck(nn.Module):
    """AdaptFormer-style adapter: down-projection, ReLU, up-projection (zero-initialised), fixed scale.

    `placement` is "parallel" (it reads the MLP's input and its output is added to the MLP's) or
    "sequential" (it reads the MLP's output and adds to it, a residual adapter after the MLP).
    The zero up-projection makes an untrained adapter add exactly 0.
    """

    def __init__(self, hidden_size: int, dim: int, scale: float, placement: str):
        super().__init__()
        self.scale, self.placement = scale, placement
        self.down = nn.Linear(hidden_size, dim)
        self.up = nn.Linear(dim, hidden_size)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x))) * self.scale


class DiTBlock(nn.Module):
    """adaLN-Zero block. Optional DiffFit scale factors multiply each branch before its gated add;
    an optional adapter joins the MLP branch; optional VPT prompts join the tokens for this block only."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.gamma_attn: nn.Parameter | None = None
        self.gamma_mlp: nn.Parameter | None = None
        self.adapter: Bottleneck | None = None
        self.prompts: nn.Parameter | None = None  # (N, hidden) VPT-deep tokens

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.prompts is not None:  # prepended here, dropped at the end: later layers never see them
            x = torch.cat([self.prompts.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.gamma_attn is not None:
            h = h * self.gamma_attn
        x = x + gate_msa.unsqueeze(1) * h
        m = modulate(self.norm2(x), shift_mlp, scale_mlp)
        h = self.mlp(m)
        if self.adapter is not None:
            h = h + self.adapter(m if self.adapter.placement == "parallel" else h)
        if self.gamma_mlp is not None:
            h = h * self.gamma_mlp
        x = x + gate_mlp.unsqueeze(1) * h
        return x if self.prompts is None else x[:, self.prompts.shape[0] :]


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        h = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, h)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(config.num_classes, h, config.class_dropout_prob)
        grid = config.input_size // config.patch_size
        # Fixed sin-cos positions; a frozen Parameter (as in the reference) so it lives in state dicts.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(h, grid, scale=config.pos_embed_scale).unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList([DiTBlock(h, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(h, config.patch_size, config.out_channels)
        self.initialize_weights()  # as the reference; free on the meta device, where loaders build

    # -- initialisation (reference: xavier linears, adaLN-Zero) ------------------------------------

    def initialize_weights(self) -> None:
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- forward -------------------------------------------------------------------------------

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) latents."""
        c, p = self.config.out_channels, self.config.patch_size
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, side * p, side * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noisy latents, t: (N,) timesteps, y: (N,) labels (num_classes = null)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t).to(x.dtype) + self.y_embedder(y)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | str = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance over a batch whose first half is conditional, second half null.

        `cfg_channels=3` is the reference behaviour (guide the first 3 of 4 epsilon channels; the
        published FIDs use it); `"all"` guides every epsilon channel.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n_eps = self.config.in_channels if cfg_channels == "all" else int(cfg_channels)
        if not 0 < n_eps <= self.config.in_channels:
            raise ValueError(f"cfg_channels must be 1..{self.config.in_channels} or 'all', got {cfg_channels!r}")
        eps, rest = out[:, :n_eps], out[:, n_eps:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    @property
    def gamma_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.gamma_attn is not None]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, scale: float = 1.0) -> torch.Tensor:
    """(grid_size**2, embed_dim) fixed positions, computed in float64 as the reference does.

    `scale` divides the grid coordinates: scale=2 on a 32x32 grid gives positions 0, 0.5, ..., 15.5,
    i.e. the 16x16 grid's scale (the DiffFit positional-encoding trick).
    """
    coords = torch.arange(grid_size, dtype=torch.float64) / scale
    # The reference meshgrids (w, h) and embeds the first (w-varying) grid into the first half.
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    emb_first = _sincos_1d(embed_dim // 2, grid_w.reshape(-1))
    emb_second = _sincos_1d(embed_dim // 2, grid_h.reshape(-1))
    return torch.cat([emb_first, emb_second], dim=1).float()


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
