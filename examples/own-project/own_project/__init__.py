"""A Flower project of its own that puts CLUES selection in front of FedProx."""
