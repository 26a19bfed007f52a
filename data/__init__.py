"""Token shards: the on-disk format and the loaders that feed training and validation."""
