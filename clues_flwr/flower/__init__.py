"""CLUES on Flower: the selection stage, the tuning wrapper, the client handlers, their
message types and the run state; thin glue over ``clues_flwr.core``."""
