"""Secrets must not survive into text a person or a log aggregator will see."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from audience_pipeline import redact as redact_module
from audience_pipeline.redact import (
    REDACTED,
    RedactingFilter,
    Redactor,
    install_log_redaction,
    redact,
    register_secret,
)

S3_PRESIGNED = (
    "https://imports.s3.eu-west-1.amazonaws.com/cxi/upload-123.csv"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Feu-west-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z"
    "&X-Amz-Expires=900"
    "&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
    "&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)
AZURE_SAS = (
    "https://hrexports.blob.core.windows.net/audiences/upload.csv"
    "?sv=2022-11-02&ss=b&srt=o&sp=rwc&se=2030-01-01T00%3A00%3A00Z&st=2024-01-01T00%3A00%3A00Z"
    "&spr=https&skoid=11111111-2222&sktid=33333333-4444&sig=AbCdEfGhIjKl%2BmNoPqRsTuVwXyZ%3D"
)


@pytest.fixture
def fresh_global(monkeypatch: pytest.MonkeyPatch) -> Redactor:
    """Isolate the process-wide redactor so tests don't leak secrets into each other."""
    redactor = Redactor()
    monkeypatch.setattr(redact_module, "GLOBAL_REDACTOR", redactor)
    return redactor


@pytest.fixture
def isolated_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("audience_pipeline_tests.redact_subject")
    yield logger
    logger.filters.clear()


def test_secrets_replaced_longest_first() -> None:
    redactor = Redactor(["s3cr3t", "s3cr3t-extended"])
    assert redactor.redact("a=s3cr3t-extended b=s3cr3t") == f"a={REDACTED} b={REDACTED}"


def test_add_extends_the_secret_set() -> None:
    redactor = Redactor()
    assert redactor.redact("key abcd1234") == "key abcd1234"
    redactor.add("abcd1234")
    assert redactor.redact("key abcd1234") == f"key {REDACTED}"


def test_short_and_empty_secrets_are_ignored() -> None:
    redactor = Redactor(["", "abc", "   ", None])
    assert len(redactor) == 0
    assert redactor.redact("abc cab abcabc") == "abc cab abcabc"


def test_url_encoded_secret_is_redacted() -> None:
    redactor = Redactor(["p@ss/w0rd+1"])
    text = "GET https://api.example.com/x?auth=p%40ss%2Fw0rd%2B1 failed for p@ss/w0rd+1"
    redacted = redactor.redact(text)
    assert "w0rd" not in redacted
    assert redacted == f"GET https://api.example.com/x?auth={REDACTED} failed for {REDACTED}"


def test_url_userinfo_is_masked() -> None:
    text = "cannot reach https://svc-user:pa@ss@sftp.example.com:8443/in/ (timeout)"
    assert Redactor().redact(text) == f"cannot reach https://{REDACTED}@sftp.example.com:8443/in/ (timeout)"


def test_plain_url_and_email_are_untouched() -> None:
    text = "POST http://127.0.0.1:8000/cxi/public-api/audience-imports?page=2 by ops@example.com"
    assert Redactor().redact(text) == text


def test_s3_presigned_url_credentials_are_masked() -> None:
    masked = Redactor().redact_url(S3_PRESIGNED)
    for leaked in ("0123456789abcdef", "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert leaked not in masked
    assert f"X-Amz-Signature={REDACTED}" in masked
    assert f"X-Amz-Credential={REDACTED}&" in masked
    assert masked.startswith("https://imports.s3.eu-west-1.amazonaws.com/cxi/upload-123.csv?")
    assert "X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host" in masked


def test_azure_sas_url_credentials_are_masked() -> None:
    masked = Redactor().redact_url(AZURE_SAS)
    assert "AbCdEfGhIjKl" not in masked
    for name in ("sv", "sp", "se", "skoid", "sktid", "sig"):
        assert f"{name}={REDACTED}" in masked
    assert "ss=b&srt=o" in masked
    assert "spr=https" in masked


def test_credential_params_in_free_text_are_masked_case_insensitively() -> None:
    text = f'error fetching "{AZURE_SAS}" and /v1/users?API_KEY=zzz999&page=2&keyword=shoes'
    masked = Redactor().redact(text)
    assert "AbCdEfGhIjKl" not in masked
    assert "zzz999" not in masked
    assert f"API_KEY={REDACTED}&page=2&keyword=shoes" in masked
    assert '&sig=***" and /v1/' in masked


def test_module_level_register_and_redact(fresh_global: Redactor) -> None:
    register_secret("env-secret-value", None, "")
    assert redact("token env-secret-value leaked") == f"token {REDACTED} leaked"
    assert "env-secret-value" in fresh_global


def test_filter_redacts_msg_and_args(
    fresh_global: Redactor, isolated_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    register_secret("hunter2-api-key")
    isolated_logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO):
        isolated_logger.info("header was hunter2-api-key")
        isolated_logger.info(
            "calling %s with key=%s", "https://u:p@x.example.com/a?sig=abc", "hunter2-api-key"
        )

    assert "hunter2" not in caplog.text
    first, second = caplog.records
    assert first.getMessage() == f"header was {REDACTED}"
    assert second.args is None
    assert second.msg == f"calling https://{REDACTED}@x.example.com/a?sig={REDACTED} with key={REDACTED}"


def test_filter_redacts_tracebacks(
    fresh_global: Redactor, isolated_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    register_secret("hunter2-api-key")
    isolated_logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.ERROR):
        try:
            raise RuntimeError("server said: bad key hunter2-api-key")
        except RuntimeError:
            isolated_logger.exception("upload failed")

    assert "RuntimeError: server said: bad key ***" in caplog.text
    assert "hunter2" not in caplog.text


def test_filter_uses_its_own_redactor(
    isolated_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    isolated_logger.addFilter(RedactingFilter(Redactor(["local-only-secret"])))
    with caplog.at_level(logging.INFO):
        isolated_logger.info("value %s", "local-only-secret")
    assert caplog.records[0].getMessage() == f"value {REDACTED}"


def test_install_is_idempotent_and_covers_existing_children() -> None:
    parent_name = "audience_pipeline_tests.install_subject"
    child = logging.getLogger(f"{parent_name}.child")
    parent = logging.getLogger(parent_name)
    try:
        install_log_redaction((parent_name,))
        install_log_redaction((parent_name,))
        for logger in (parent, child):
            assert sum(isinstance(f, RedactingFilter) for f in logger.filters) == 1
    finally:
        parent.filters.clear()
        child.filters.clear()


def test_install_on_root_logger_by_empty_name() -> None:
    root = logging.getLogger()
    before = list(root.filters)
    try:
        install_log_redaction(("",))
        install_log_redaction(("",))
        assert sum(isinstance(f, RedactingFilter) for f in root.filters) == 1
    finally:
        root.filters[:] = before
