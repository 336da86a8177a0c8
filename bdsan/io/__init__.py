"""Safe model loading, the architecture registry and holdout data."""
