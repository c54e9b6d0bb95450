"""The inventory: ``ssh-agents.toml`` (config.py), how each agent is reached (routes.py:
ssh_config resolved into hops) and label selectors (labels.py). Above ssh/ (routes resolve through
it), below telemetry, hosts and jobs."""
