"""What every stage shares, written once: run folders, checkpoints, logging, batch streams, optimizers, steps."""
