"""Data: sources, Ray Data preprocessing into packed token shards, and the training reader."""
