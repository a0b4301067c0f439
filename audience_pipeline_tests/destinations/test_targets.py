"""What each vendor's feed writes to, as descriptions, metadata and log lines say it."""

from __future__ import annotations

import pytest

from audience_pipeline.destinations.registry import describe_target
from audience_pipeline.feeds.model import FeedsFile

DESTINATIONS = {
    "cxi": {"type": "communicate_xi", "base_url": "http://x", "api_key": {"env_var": "K"}},
    "aep": {
        "type": "adobe_experience_platform",
        "client_id": "c",
        "client_secret": {"env_var": "S"},
        "org_id": "o",
    },
    "apsis": {"type": "apsis_one", "client_id": "c", "client_secret": {"env_var": "S"}},
    "yesmail": {"type": "yesmail", "api_user": "u", "api_key": {"env_var": "K"}},
    "altcraft": {"type": "altcraft", "base_url": "http://x", "token": {"env_var": "T"}},
}


@pytest.mark.parametrize(
    ("destination", "options", "target"),
    [
        ("cxi", {"import_name": "All staff"}, 'Communicate XI import "All staff"'),
        ("aep", {"audience_name": "All staff"}, 'Experience Platform audience "All staff"'),
        (
            "aep",
            {"audience_name": "All staff", "audience_id": "a1"},
            'Experience Platform audience "All staff" (id a1)',
        ),
        (
            "apsis",
            {"section": "com.apsis1.sections.hr"},
            'APSIS One section "com.apsis1.sections.hr" (keyspace com.apsis1.keyspaces.crm, key unique_id)',
        ),
        ("yesmail", {"target_list": "all-staff"}, 'Yesmail target list "all-staff"'),
        (
            "altcraft",
            {"trigger_id": 13},
            "Altcraft trigger 13 (profiles matched by email; sends the trigger's campaign)",
        ),
        (
            "altcraft",
            {"trigger_id": 13, "matching": "custom", "field_name": "EMPLOYEE_ID", "skip_triggers": True},
            "Altcraft trigger 13 (profiles matched by EMPLOYEE_ID; no campaign sent)",
        ),
        ("cxi", {"import_name": ""}, "Communicate XI"),  # options the loader refuses: the vendor's name
    ],
)
def test_every_vendor_names_its_target(destination: str, options: dict, target: str) -> None:
    feeds = FeedsFile.model_validate(
        {
            "sources": {"drop": {"type": "folder", "path": "/srv/hr"}},
            "destinations": {destination: DESTINATIONS[destination]},
            "feeds": [
                {
                    "name": "f",
                    "source": "drop",
                    "destination": destination,
                    "mapping": {"unique_id": "ID", "email": "Email"},
                    "options": options,
                }
            ],
        }
    )
    assert describe_target(feeds.destination_for(feeds.feeds[0]), options) == target
