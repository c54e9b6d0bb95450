"""``fleetctl serve``: the controller that runs every agent's heartbeat and the job queue
(controller.py), and its Prometheus exporter (metrics.py). The top of the library: it uses
Fleet (hosts and jobs)."""
