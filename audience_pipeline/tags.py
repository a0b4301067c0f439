"""Run tags and metadata keys the pipeline's automation reads back from the Dagster instance.

Keeping them in one place lets the assets, the sensors and ``sync`` agree on what a run is
(which attempt, which import it reports, which process runs it) without a side database.
"""

PARTITION_TAG = "dagster/partition"
RUN_KEY_TAG = "dagster/run_key"
ATTEMPT_TAG = "audience_pipeline/attempt"
"""Ingest attempt number (1 = first run of the file); each retry is its own run and run key."""
IMPORT_TAG = "audience_pipeline/import"
"""On report runs: the key of the import (``JobHandle.key``) the report is for."""
VENDOR_STATUS_TAG = "audience_pipeline/vendor_status"
FINAL_STATE_TAG = "audience_pipeline/final_state"
"""On report runs: why the import ended — the vendor's final word, ``timed_out`` or ``poll_failed``."""
FINAL_DETAIL_TAG = "audience_pipeline/final_detail"
FINAL_JOB_STATE_TAG = "audience_pipeline/final_job_state"
"""On report runs: ``succeeded`` or ``failed`` as the sensor's last poll saw it, so the report
takes the vendor's final word from the tags instead of polling a finished job again."""
PROCESS_TAG = "audience_pipeline/process"
"""On runs executed in-process by ``sync``/``demo``: ``host:pid:start``, so a later ``sync`` can
tell that the process died (``kill -9``) and mark the run failed; the daemon's runs have run
monitoring for that instead."""
OUTCOME_METADATA = "audience_pipeline/outcome"
"""On a ``dg.Failure``: ``refused`` when the file itself is unusable, so it is not retried."""

POLL_GAVE_UP = ("timed_out", "poll_failed")
"""Final states the pipeline decides itself (not the vendor's word)."""
