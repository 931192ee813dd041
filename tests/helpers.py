"""What several test modules share: a small demo run that still exercises every phase."""

SMALL = {
    "demo-pool-size": 40,
    "test-size": 24,
    "trace-rounds": 1,
    "local-steps": 2,
    "num-server-rounds": 2,
    "batch-size": 8,
    "max-new-tokens": 4,
    "fraction-evaluate": 0.0,
}
