"""The research harness: selection benchmarks, results writer, backbone pretraining, an
in-process grid and timers. Drivers and tests use it; a FAB does not carry it."""
