"""Kafka and Redis I/O: clients, key layout, the fenced commit, the snapshot reader."""
