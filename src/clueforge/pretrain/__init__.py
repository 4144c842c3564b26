"""Pretraining: typed config, packed data with dynamic masking, checkpoints, the training loop."""
