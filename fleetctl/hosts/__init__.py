"""The host core: ``Hosts`` (core.py: the agents of an inventory, one kept connection each,
heartbeat rounds on a bounded pool), fan-out of commands (fanout.py), ``register-ssh``
(registration.py), ``doctor`` (doctor.py) and host-key trust (trust.py). Jobs build on it; it
never imports jobs."""
