"""fit(): its config, the training step, validation, checkpoints and exact resume, recipes, runs and trackers."""
