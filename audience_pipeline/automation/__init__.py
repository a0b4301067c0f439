"""Sensors and schedules, one module per family: arrival (new files), status (imports end and
get reports), retries (failed ingests run again), alerts (a person is told), and lifecycle (the
partition states they all read)."""
