"""Training data: image folders, Hugging Face datasets, the latent cache and the batch order."""
