"""difffit: adapt pre-trained diffusion transformers to new domains with DiffFit."""

__version__ = "0.1.0"
