"""Training data for CORAL drafters: from pinned sources to token shards and features."""
