"""Telemetry: the snapshot types (snapshot.py), the heartbeat's remote command and its parsing
(heartbeat.py, gpu_tools.py, parsers/), GPU health judgment (gpu_health.py), the one error->status
table (outcomes.py), history and agent health in the store (history.py, health.py), DataFrames and
plots (frames.py, plotting.py). Above ssh/, store/ and inventory/; knows nothing of jobs."""
