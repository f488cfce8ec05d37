"""`workers: N`: the daemon's worker processes. `pool` is the parent's side (WorkerPool, seen by
the service as its pipeline), `process` the entry point of each child (`python -m
daemon.workers.process`)."""
