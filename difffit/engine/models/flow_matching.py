"""Rectified flow as SD3 and FLUX were trained: the loss of one batch and the timesteps it is drawn at.

The noisy input is x_t = (1 - sigma) x0 + sigma noise and the model predicts the velocity noise - x0
(Esser et al. 2024, "Scaling Rectified Flow Transformers"). Everything that has a library version is the
library's, as diffusers' own SD3 and FLUX training scripts use it:
- timesteps: `compute_density_for_timestep_sampling` (logit-normal by default, or uniform, or the
  "mode" density), a draw u in (0, 1) mapped to one of the scheduler's training steps;
- sigmas: the base's `FlowMatchEulerDiscreteScheduler` (its config from the pipeline), whose training
  sigmas already carry the base's shift (SD3: 3); a base with dynamic shifting (FLUX.1-dev) shifts them by
  the image's token count with the scheduler's `time_shift` and the pipeline's `calculate_shift`, as its
  pipeline shifts the sampling sigmas;
- weighting: `compute_loss_weighting_for_sd3` (1 for these densities).
Written here: x_t, the target and the mean, two lines each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difffit.engine.models.diffusion import ModelFn

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOGIT_MEAN, LOGIT_STD, MODE_SCALE = 0.0, 1.0, 1.29  # diffusers' training scripts' defaults (SD3 paper: m=0, s=1)


class FlowMatching:
    """The training loss of a rectified-flow base. `model(x_t, t)` is called with the scheduler's
    timesteps (sigma * num_train_timesteps); `tokens(x0)` is the image token count of a latent batch, which
    dynamic shifting needs."""

    def __init__(
        self, scheduler_config: dict, tokens: Callable[[torch.Tensor], int], timestep_sampling: str = "logit_normal"
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep sampling {timestep_sampling!r}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_steps = self.scheduler.config.num_train_timesteps
        self.tokens, self.timestep_sampling = tokens, timestep_sampling

    def draw(self, generator: torch.Generator, batch: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, noise) for one micro-batch, drawn on the generator's device: u (batch,) in (0, 1) from the
        timestep density, noise (batch, *shape)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.timestep_sampling,
            batch,
            LOGIT_MEAN,
            LOGIT_STD,
            MODE_SCALE,
            device=generator.device,
            generator=generator,
        )
        noise = torch.randn((batch, *shape), generator=generator, device=generator.device)
        return u, noise

    def sigmas(self, u: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise level of each draw: one of the scheduler's training sigmas, shifted by resolution where
        the base shifts dynamically."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        index = (u * self.num_steps).long().clamp(0, self.num_steps - 1)
        sigmas = self.scheduler.sigmas.to(u.device)[index]
        config = self.scheduler.config
        if config.use_dynamic_shifting:
            mu = calculate_shift(
                self.tokens(x0),
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
            sigmas = self.scheduler.time_shift(mu, 1.0, sigmas)
        return sigmas

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        u: torch.Tensor,
        noise: torch.Tensor,
        mse_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss: the weighted MSE between the model's velocity and noise - x0. "mse" is the
        unweighted one; "vb" is 0 (no variational-bound term: the variance is not learned)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if mse_weights is not None:
            raise ValueError("flow matching takes no epsilon-loss weights")
        sigma = self.sigmas(u, x0).view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - sigma) * x0 + sigma * noise
        prediction = model(xt, sigma.flatten() * self.num_steps).float()
        dims = tuple(range(1, x0.ndim))
        error = (prediction - (noise - x0).float()).pow(2)
        weighting = compute_loss_weighting_for_sd3(self.timestep_sampling, sigmas=sigma).float()
        mse = error.mean(dim=dims)
        return {"loss": (weighting * error).mean(dim=dims), "mse": mse, "vb": torch.zeros_like(mse)}

    def mse_weights(self, snr_gamma: float | None = None, p2_gamma: float | None = None) -> None:
        """Min-SNR and P2 weight the epsilon objective; fit refuses them for flow bases before this is asked."""
        if snr_gamma is not None or p2_gamma is not None:
            raise ValueError("min-SNR and P2 weightings are for epsilon prediction")
        return None
