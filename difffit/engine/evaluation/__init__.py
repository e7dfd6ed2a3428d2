"""Sampling (SamplingOptions, the sampling loop, sample folders) and FID with its inputs and Inception."""
