"""The stream worker: configuration, partition shards, the consume loop, worker processes."""
