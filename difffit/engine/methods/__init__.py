"""What each method trains (DiffFit and the paper's baselines), the adapter file, merge, and adapter-or-base sources."""
