"""Watching the metrics topic: windowed aggregates, drift alerts, history, served live.

Modules, each depending only on those listed before it:
`windows` (window accumulators), `drift` (drop detection), `pooling` (workers pooled per model),
`history` (Redis), `state` (what the views show), `terminal` and `dashboard` (the views),
`app` (the faust app), `service` (running it all).
"""
