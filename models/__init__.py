"""Recommendation models: pure computation over integer-coded micro-batches.

Nothing here imports Kafka, Redis or HTTP code. See `models.base` for the
interface every model shares and `models.registry` for the names.
"""
