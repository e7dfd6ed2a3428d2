"""Gaussian diffusion as DiT trained it: linear betas, learned-range variance, the hybrid loss,
and respaced DDPM / DDIM steps.

Coefficients are computed in float64 and cast to float32 when gathered, as the reference does,
so losses and steps match it to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, spacing: str | int) -> list[int]:
    """The original steps kept by a respacing: "250", "10,20" (sections) or "ddim25" (even stride)."""
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        desired = int(spacing[len("ddim") :])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise ValueError(f"Cannot take exactly {desired} evenly strided steps out of {num_steps}.")
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"Cannot take {count} steps out of a section of {size}.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept.update(start + round(stride * j) for j in range(count))
        start += size
    return sorted(kept)


def draw_timesteps_and_noise(
    generator: torch.Generator, batch: int, shape: tuple[int, ...], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, noise) for one micro-batch, drawn on the generator's device: t (batch,), noise (batch, *shape).

    Successive calls on one generator give the successive micro-batches of a step.
    """
    device = generator.device
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)
    noise = torch.randn((batch, *shape), generator=generator, device=device)
    return t, noise


class GaussianDiffusion:
    """A (possibly respaced) diffusion process. `timesteps[i]` is the original step of spaced step i;
    the model is always called with original timesteps."""

    def __init__(
        self, spacing: str | int | None = None, num_train_steps: int = 1000, betas: torch.Tensor | None = None
    ):
        # `betas` (float64): another family's schedule; default DiT's linear 1e-4..0.02.
        base_betas = linear_betas(num_train_steps) if betas is None else betas.to(torch.float64)
        base_alphas_cumprod = torch.cumprod(1 - base_betas, dim=0)
        self.timesteps = space_timesteps(num_train_steps, spacing) if spacing else list(range(num_train_steps))
        # Respacing keeps the cumulative products at the kept steps and re-derives the betas.
        kept = base_alphas_cumprod[self.timesteps]
        betas = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        kept = torch.cumprod(1 - betas, dim=0)  # re-derived from the betas, as the reference does
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        self.num_steps = len(betas)
        self.betas = betas
        self.alphas_cumprod = kept
        self.alphas_cumprod_prev = prev
        self.sqrt_alphas_cumprod = kept.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - kept).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / kept).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / kept - 1).sqrt()
        posterior_variance = betas * (1 - prev) / (1 - kept)
        # The first posterior variance is 0; the reference clips its log with the second one.
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1 - kept)
        self.posterior_mean_coef2 = (1 - prev) * (1 - betas).sqrt() / (1 - kept)
        self.log_betas = betas.log()
        self._timestep_map = torch.tensor(self.timesteps)

    @staticmethod
    def _gather(arr: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = arr.to(index.device)[index].float()
        return out.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def original_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        return self._timestep_map.to(index.device)[index]

    # -- forward process ---------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._gather(self.sqrt_alphas_cumprod, index, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, index, x0) * noise
        )

    def q_posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return (
            self._gather(self.posterior_mean_coef1, index, xt) * x0
            + self._gather(self.posterior_mean_coef2, index, xt) * xt
        )

    # -- reverse process ---------------------------------------------------------------------------

    def p_mean_variance(
        self, model_output: torch.Tensor, xt: torch.Tensor, index: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Mean, log-variance and predicted x0 from a learned-sigma model output (eps, v)."""
        eps, var_values = model_output.split(xt.shape[1], dim=1)
        min_log = self._gather(self.posterior_log_variance_clipped, index, xt)
        max_log = self._gather(self.log_betas, index, xt)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (
            self._gather(self.sqrt_recip_alphas_cumprod, index, xt) * xt
            - self._gather(self.sqrt_recipm1_alphas_cumprod, index, xt) * eps
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self.q_posterior_mean(pred_xstart, xt, index)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def ddpm_step(
        self, model_output: torch.Tensor, xt: torch.Tensor, index: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}; no noise is added at index 0."""
        out = self.p_mean_variance(model_output, xt, index)
        nonzero = (index != 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        xt: torch.Tensor,
        index: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """One DDIM step (deterministic with eta=0), using the predicted x0 as the reference does."""
        out = self.p_mean_variance(model_output, xt, index)
        x0 = out["pred_xstart"]
        eps = (self._gather(self.sqrt_recip_alphas_cumprod, index, xt) * xt - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, index, xt
        )
        alpha_bar = self._gather(self.alphas_cumprod, index, xt)
        alpha_bar_prev = self._gather(self.alphas_cumprod_prev, index, xt)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        mean = x0 * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta == 0 or noise is None:
            return mean
        nonzero = (index != 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return mean + nonzero * sigma * noise

    # -- training loss -------------------------------------------------------------------------------

    def draw(self, generator: torch.Generator, batch: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise) of one micro-batch: steps drawn uniformly, as DiT trains."""
        return draw_timesteps_and_noise(generator, batch, shape, self.num_steps)

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        index: torch.Tensor,
        noise: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample hybrid loss: MSE on epsilon + the variational bound for the learned variance.

        `model(xt, t)` is called with original timesteps. Inside the VB term the predicted mean is
        detached, so the VB term trains only the variance (IDDPM's L_hybrid). `mse_weights` (one per
        step, from `mse_weights`) reweights the MSE term only: min-SNR and P2 are derived for the
        epsilon objective, while the VB term is already the exact bound for the variance and
        reweighting it would no longer make it one. "mse" stays the unweighted MSE, for the log.
        """
        xt = self.q_sample(x0, index, noise)
        output = model(xt, self.original_timesteps(index))
        eps, var_values = output.split(x0.shape[1], dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, index)
        mse = (noise - eps).float().pow(2).mean(dim=tuple(range(1, x0.ndim)))
        weighted = mse if mse_weights is None else mse_weights.to(mse.device)[index].float() * mse
        return {"loss": weighted + vb, "mse": mse, "vb": vb}

    def mse_weights(self, snr_gamma: float | None = None, p2_gamma: float | None = None) -> torch.Tensor | None:
        """Per-step weights of the epsilon MSE (float64), None when neither weighting is on.

        SNR(t) = alpha_bar / (1 - alpha_bar). Min-SNR-gamma (Hang et al. 2023) caps the x0-space weight
        at gamma, which for epsilon prediction is min(SNR, gamma) / SNR. P2 (Choi et al. 2022, k = 1)
        is 1 / (1 + SNR)^gamma. Both given: their product.
        """
        if snr_gamma is None and p2_gamma is None:
            return None
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        weights = torch.ones_like(snr)
        if snr_gamma is not None:
            weights = weights * snr.clamp(max=snr_gamma) / snr
        if p2_gamma is not None:
            weights = weights / (1 + snr) ** p2_gamma
        return weights

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; decoder NLL at the first step."""
        true_mean = self.q_posterior_mean(x0, xt, index)
        true_log_var = self._gather(self.posterior_log_variance_clipped, index, xt)
        out = self.p_mean_variance(model_output, xt, index)
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=dims) / math.log(2.0)
        return torch.where(index == 0, nll, kl)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
