"""CLUES's maths, with no Flower import: scores and signals, their standardisation and
combination, the threshold rules, aggregation, trajectory checkpoints, selection metrics
and pollution. The Flower layer, the demo app and every driver call these same functions."""
