"""Event schema, synthetic generator, dataset readers and the producer API."""
