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
"""Written on report runs by earlier releases (the vendor's word); no longer written."""
FINAL_STATE_TAG = "audience_pipeline/final_state"
"""On report runs of imports the pipeline ended itself: ``timed_out``, ``poll_failed`` or
``nothing_submitted``. When the vendor ended the import, its word and the job state travel in
the run's config (``assets.ReportConfig``), not in tags; earlier releases tagged them here."""
FINAL_DETAIL_TAG = "audience_pipeline/final_detail"
FINAL_JOB_STATE_TAG = "audience_pipeline/final_job_state"
"""On report runs of earlier releases: ``succeeded`` or ``failed`` as the sensor's last poll saw it."""
PROCESS_TAG = "audience_pipeline/process"
"""On runs executed in-process by ``sync``/``demo``: ``host:pid:start``, so a later ``sync`` can
tell that the process died (``kill -9``) and mark the run failed; the daemon's runs have run
monitoring for that instead."""
OUTCOME_METADATA = "audience_pipeline/outcome"
"""On a ``dg.Failure``: ``refused`` when the file itself is unusable, so it is not retried."""
OUTCOME_TAG = "audience_pipeline/outcome"
"""On report runs, added when the report is written: the normalised outcome, one word for every
vendor (``completed``, ``completed_with_failures``, ``failed``, ``timed_out``, ``poll_failed``,
``unchanged``). The vendor's own word is the report's ``vendor_status`` metadata, never a tag: a
run that imported 192 of 194 rows must not read "failed"."""

POLL_GAVE_UP = ("timed_out", "poll_failed")
"""Final states the pipeline decides itself (not the vendor's word)."""
