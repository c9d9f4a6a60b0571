"""streamrec stream side: Kafka workers, Redis state, evaluator, lookup API, monitor, CLI."""
