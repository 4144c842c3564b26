"""Fine-tuning on CLUE-family tasks: one loop for every task family, switchable tricks."""
