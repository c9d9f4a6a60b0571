"""Live lookups: the model cache over Redis, scorers, the HTTP API and its client."""
