"""The input side: the pool of ingredient checkpoints, the model they are instances of, the
evaluation sets (task pool) and where all of them are stored."""
