"""The model layer: the DiT (reference numerics), diffusion and samplers, bases and checkpoint formats,
fp8 and compile."""
