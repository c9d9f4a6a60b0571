"""Watching the metrics topic: windows, drift alerts, history, the faust app, dashboard and terminal view."""
