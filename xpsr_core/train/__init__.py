"""Training XPSR: streamed training shards, the step function, checkpoints and logs."""
