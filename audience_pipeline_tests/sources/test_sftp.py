"""The SFTP source against a real asyncssh server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from audience_pipeline.sources.base import SourceUnavailable, fingerprint, stage
from audience_pipeline.sources.sftp import SftpSourceResource
from audience_pipeline_tests.sources.servers import SFTP_PASSWORD, SFTP_USER, SftpTestServer


@pytest.fixture
def sftp(tmp_path: Path) -> Iterator[SftpTestServer]:
    root = tmp_path / "sftp-root"
    (root / "outbound").mkdir(parents=True)
    server = SftpTestServer(root)
    server.start()
    try:
        yield server
    finally:
        server.shutdown()


def _source(server: SftpTestServer, **overrides) -> SftpSourceResource:
    options = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": SFTP_USER,
        "password": SFTP_PASSWORD,
        "known_hosts": server.known_hosts_line,
        "remote_dir": "outbound",
        "timeout_seconds": 5.0,
    }
    return SftpSourceResource(**{**options, **overrides})


def test_lists_matching_files_with_size_and_mtime(sftp: SftpTestServer) -> None:
    out = sftp.root / "outbound"
    (out / "employees.csv").write_bytes(b"a,b\n1,2\n")
    (out / "notes.txt").write_text("ignored")
    (out / ".employees.csv.part").write_text("hidden upload")
    (out / "archive").mkdir()
    os.utime(out / "employees.csv", (1_700_000_000, 1_700_000_000))

    files = _source(sftp).list_files()

    assert [(f.name, f.size, f.modified_ns, f.marked) for f in files] == [
        ("employees.csv", 8, 1_700_000_000 * 10**9, None)
    ]


def test_streams_a_large_file_into_staging_with_its_sha256(sftp: SftpTestServer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (sftp.root / "outbound" / "big.csv").write_bytes(data)
    source = _source(sftp)

    staged = stage(source, "big.csv", tmp_path / "staging")

    assert staged.sha256 == hashlib.sha256(data).hexdigest() == fingerprint(source, "big.csv")
    assert staged.size == len(data)
    assert Path(staged.path).read_bytes() == data


def test_private_key_auth_from_key_text(sftp: SftpTestServer) -> None:
    (sftp.root / "outbound" / "a.csv").write_text("x\n")
    source = _source(sftp, password=None, private_key=sftp.private_key_text)

    assert [f.name for f in source.list_files()] == ["a.csv"]


def test_known_hosts_as_a_file_and_as_a_bare_key_line(sftp: SftpTestServer, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(sftp.known_hosts_line + "\n")
    assert _source(sftp, known_hosts=str(path)).list_files() == []
    bare = sftp.known_hosts_line.split(" ", 1)[1]
    assert _source(sftp, known_hosts=bare).list_files() == []


def test_unknown_or_changed_host_key_is_refused(sftp: SftpTestServer, tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()
    with pytest.raises(SourceUnavailable, match=r"127\.0\.0\.1.*host key does not match"):
        _source(sftp, known_hosts=f"[127.0.0.1]:{sftp.port} {other}").list_files()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(SourceUnavailable, match=r"hr-drop@127\.0\.0\.1:\d+: SSHException.*known_hosts"):
        _source(sftp, known_hosts=str(empty)).list_files()


def test_wrong_password_names_the_host_and_not_the_password(sftp: SftpTestServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-sftp-pass-93c1f0"
    with pytest.raises(SourceUnavailable) as info:
        _source(sftp, password=wrong).list_files()
    assert f"{SFTP_USER}@127.0.0.1:{sftp.port}" in str(info.value)
    assert "authentication failed" in str(info.value)
    assert wrong not in str(info.value) and wrong not in caplog.text


def test_server_down_is_an_error_naming_the_host(sftp: SftpTestServer) -> None:
    source = _source(sftp)
    sftp.stop()
    with pytest.raises(SourceUnavailable, match=rf"sftp {SFTP_USER}@127\.0\.0\.1:{sftp.port}: "):
        source.list_files()
    sftp.start()
    assert source.list_files() == []


def test_ready_marker_and_move_processed(sftp: SftpTestServer) -> None:
    out = sftp.root / "outbound"
    (out / "a.csv").write_text("a\n")
    (out / "b.csv").write_text("b\n")
    (out / "b.csv.done").write_text("")
    source = _source(sftp, ready_marker=".done", move_processed_to="processed")

    assert [(f.name, f.marked) for f in source.list_files()] == [("a.csv", False), ("b.csv", True)]
    assert source.processed_action() == "move to outbound/processed"

    source.mark_processed("b.csv")

    assert sorted(p.name for p in (out / "processed").iterdir()) == ["b.csv", "b.csv.done"]
    assert [f.name for f in source.list_files()] == ["a.csv"]
    with source.open("b.csv") as fh:  # a partition whose staged copy is gone is still readable
        assert fh.read() == b"b\n"
    with pytest.raises(FileNotFoundError):
        source.open("../a.csv")


def test_feeds_file_needs_a_credential_and_keeps_it_an_env_var() -> None:
    import dagster as dg
    from pydantic import ValidationError

    from audience_pipeline.feeds.model import FeedsFile
    from audience_pipeline.sources.registry import build_source_resource

    def feeds(**source) -> FeedsFile:
        return FeedsFile.model_validate(
            {
                "sources": {"hr": {"type": "sftp", "host": "sftp.example", "username": "u", **source}},
                "destinations": {
                    "cxi": {
                        "type": "communicate_xi",
                        "base_url": "http://x",
                        "api_key": {"env_var": "CXI_API_KEY"},
                    }
                },
                "feeds": [],
            }
        )

    with pytest.raises(ValidationError, match="set 'password' or 'private_key'"):
        feeds()
    resource = build_source_resource(
        feeds(private_key={"env_var": "SFTP_KEY"}, ready_marker=".done").sources["hr"]
    )
    assert isinstance(resource.private_key, dg.EnvVar) and resource.password is None
    assert resource.host_key_checking is True and resource.stable_after_seconds == 60
    assert resource.ready_marker == ".done"
