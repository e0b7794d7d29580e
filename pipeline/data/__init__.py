"""Data: sources, preprocessing on Ray into packed token shards, and the training reader."""
