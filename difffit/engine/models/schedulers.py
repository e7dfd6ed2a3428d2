"""The samplers `difffit sample` offers: the reference's respaced DDPM and DDIM, and DPM-Solver++.

Each turns a model output at one step into the next latents; the loop that drives them is
sample.sample_denoised.
"""

from __future__ import annotations

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.models.diffusion import GaussianDiffusion

SCHEDULERS = ("ddpm", "ddim", "dpm-solver")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 25}


class ReferenceSampler:
    """The reference's respaced samplers: ancestral DDPM with the learned variance, or DDIM (eta 0)."""

    def __init__(self, kind: str, steps: int):
        self.stochastic = kind == "ddpm"
        # DDIM uses the reference's even-stride "ddimN" spacing when N allows one (25, 50, 100, ...),
        # otherwise the section spacing "N" that the reference's sample.py uses for DDPM.
        spacing = str(steps)
        if kind == "ddim" and any(len(range(0, 1000, s)) == steps for s in range(1, 1000)):
            spacing = f"ddim{steps}"
        self.diffusion = GaussianDiffusion(spacing)
        self.timesteps = self.diffusion.timesteps[::-1]  # original timesteps, in sampling order

    def reset(self) -> None:
        pass

    def step_at(
        self, index: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """x_t -> x_{t-1} at spaced step `index` (per sample); DDPM without noise returns the mean."""
        if self.stochastic:
            return self.diffusion.ddpm_step(model_output, x, index, torch.zeros_like(x) if noise is None else noise)
        return self.diffusion.ddim_step(model_output, x, index)

    def step(self, k: int, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        index = torch.full((len(x),), self.diffusion.num_steps - 1 - k, device=x.device, dtype=torch.long)
        return self.step_at(index, model_output, x, noise)


class DPMSolverSampler:
    """diffusers' multistep DPM-Solver++ on DiT's schedule (linear betas 1e-4..0.02, 1000 steps),
    driven by the epsilon half of the model output; deterministic, for quick previews."""

    stochastic = False

    def __init__(self, steps: int):
        from diffusers import DPMSolverMultistepScheduler

        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
        )
        self.steps = steps
        self.reset()
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    def reset(self) -> None:
        self.scheduler.set_timesteps(self.steps)  # clears the multistep history between batches

    def step(self, k: int, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        eps = model_output[:, : x.shape[1]]
        return self.scheduler.step(eps, self.scheduler.timesteps[k], x).prev_sample


def checked_steps(scheduler: str, steps: int | None) -> int:
    """The number of steps `scheduler` runs (its default for None), or a one-sentence error."""
    if scheduler not in SCHEDULERS:
        raise DiffFitError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    steps = DEFAULT_STEPS[scheduler] if steps is None else steps
    if not 1 <= steps <= 1000:
        raise DiffFitError(f"--steps must be between 1 and 1000 (got {steps}).")
    if steps == 1 and scheduler != "dpm-solver":
        # The reference's respacing keeps only timestep 0 for one step: it would start at noise level 0.
        raise DiffFitError(
            f"--scheduler {scheduler} needs 2 or more --steps (one step keeps only timestep 0, which never denoises).",
            hint="Use --steps 2 or more, or --scheduler dpm-solver.",
        )
    return steps


def make_sampler(scheduler: str, steps: int | None = None) -> ReferenceSampler | DPMSolverSampler:
    steps = checked_steps(scheduler, steps)
    if scheduler == "dpm-solver":
        return DPMSolverSampler(steps)
    return ReferenceSampler(scheduler, steps)
