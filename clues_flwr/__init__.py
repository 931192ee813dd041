"""CLUES data selection for federated LoRA fine-tuning, as a Flower app."""
