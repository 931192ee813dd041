"""The demo Flower app: the embedded model and data, a run folder per run."""
