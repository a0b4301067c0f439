"""How often the Dagster daemon really ticks a sensor.

The sensor daemon looks at every sensor once per loop of 5 s (``MIN_INTERVAL_LOOP_TIME`` in
``dagster._daemon.sensor``) and ticks those whose ``minimum_interval_seconds`` has passed since
their last tick. A loop starts a few milliseconds early or late, so an interval equal to a
multiple of the loop is just missed about every other time and the sensor ticks one loop later:
measured under ``benchmarks/bench_latency.py``, a 5 s new-file sensor ticked every 5 or 10 s. One
second less than the wanted interval makes the daemon tick at the wanted loop every time.
"""

from __future__ import annotations

DAEMON_LOOP_SECONDS = 5


def minimum_interval(every_seconds: int) -> int:
    """``minimum_interval_seconds`` for a sensor meant to tick every ``every_seconds``."""
    return max(1, every_seconds - 1)
