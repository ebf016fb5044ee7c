"""What every training stage shares: optimiser and guard, train state, checkpoints,
metrics, the loop (one file each)."""
