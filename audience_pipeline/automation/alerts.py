"""Tell a person when a file needs one: a webhook post per sensor tick with every new problem.

The feeds file's ``alerts:`` block names a webhook (``${VAR}``: the URL embeds its token) and the
states to report: ``needs_attention`` (failed after its retries), ``blocked`` (too many rows
rejected), ``refused`` (not a usable CSV) and ``timed_out`` (an import that ended without the
vendor's answer: its time limit, or status polls that kept failing). The body is
``{"text": …}``, which Slack incoming webhooks and Teams' incoming-webhook connectors accept.

Why a sensor over the partition states and not Dagster's run-failure sensor: a blocked file's
run may succeed, a timed-out import is decided by the status sensor, and a failed attempt that
will be retried is not news. The cursor is the time of the newest state already announced, so
each state change is posted once; a post that fails is tried again next tick.
"""

from __future__ import annotations

import json
import time

import dagster as dg
import httpx

from audience_pipeline.assets import FeedKeys
from audience_pipeline.automation.lifecycle import PartitionState, feed_states
from audience_pipeline.redact import redact
from audience_pipeline.tags import POLL_GAVE_UP

ALERTS_SENSOR = "audience_pipeline__alerts"
ALERTS_RESOURCE = "alerts_webhook"
MAX_LINES = 20


class AlertWebhook(dg.ConfigurableResource):
    """Where alerts go; the URL comes from ``EnvVar`` and is never logged."""

    webhook_url: str
    timeout_seconds: float = 10.0

    def post(self, text: str) -> None:
        try:
            response = httpx.post(self.webhook_url, json={"text": text}, timeout=self.timeout_seconds)
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise RuntimeError(f"alert webhook answered {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise RuntimeError(f"alert webhook unreachable: {type(exc).__name__}") from None


def alert_kind(state: PartitionState) -> str | None:
    if state.state in ("needs_attention", "blocked", "refused"):
        return state.state
    if state.state == "reported" and state.detail in POLL_GAVE_UP:
        return "timed_out"
    return None


def alert_line(state: PartitionState, kind: str) -> str:
    what = {
        "needs_attention": "needs attention",
        "blocked": "blocked by validation",
        "refused": "file refused",
        "timed_out": "import ended without the vendor's answer",
    }[kind]
    detail = f": {state.detail}" if state.detail and state.detail not in POLL_GAVE_UP else ""
    return f"• {state.feed} / {state.partition} — {what}{detail}"


def alert_text(lines: list[str]) -> str:
    shown = lines[:MAX_LINES] + ([f"… and {len(lines) - MAX_LINES} more"] if len(lines) > MAX_LINES else [])
    return "\n".join([f"audience_pipeline: {len(lines)} HR file(s) need a person", *shown])


def build_alerts_sensor(all_keys: list[FeedKeys], on: list[str]) -> dg.SensorDefinition:
    @dg.sensor(
        name=ALERTS_SENSOR,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={ALERTS_RESOURCE},
        description=f"Posts to the alerts webhook when a file's state becomes one of: {', '.join(on)}.",
    )
    def alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        since = float(json.loads(context.cursor)["since"]) if context.cursor else 0.0
        fresh: list[tuple[float, str]] = []
        for keys in all_keys:
            for state in feed_states(context.instance, keys, keys.feed.retries).values():
                kind = alert_kind(state)
                if kind in on and state.since > since:
                    fresh.append((state.since, alert_line(state, kind)))
        if not fresh:
            return dg.SkipReason("nothing new to announce")
        fresh.sort()
        webhook = getattr(context.resources, ALERTS_RESOURCE)
        try:
            webhook.post(alert_text([line for _, line in fresh]))
        except RuntimeError as exc:
            context.log.warning(f"{redact(str(exc))}; tried again next tick")
            return dg.SkipReason(redact(str(exc)))
        context.update_cursor(json.dumps({"since": max(t for t, _ in fresh), "at": time.time()}))
        return dg.SkipReason(f"announced {len(fresh)} file(s)")

    return alerts
