"""Development only: the embedded broker and Redis, and the demo. Nothing at runtime imports it."""
