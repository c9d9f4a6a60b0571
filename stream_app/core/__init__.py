"""Below everything: errors, typed settings, the event schema. Imports nothing of the project."""
