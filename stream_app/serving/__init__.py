"""Live lookups from the state the workers write to Redis.

cache (ModelCache: shard views kept fresh) -> view (ShardView: one shard, prepared) -> scorers
(what a lookup ranks with, from the `models.base.Model` serving contract) -> recommender (the
answers) -> api (HTTP: routes, errors, metrics, params; openapi declares them; keys and guards
protect POST /events); client is the Python client.
"""
