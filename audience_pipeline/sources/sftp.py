"""An SFTP drop (the usual way HR systems deliver scheduled exports).

- Host keys are checked by default: ``known_hosts`` is a path to a known_hosts file or one
  inline line (``[host]:port ssh-ed25519 AAAA…``, or just ``ssh-ed25519 AAAA…`` for the
  configured host); without it the user's ``~/.ssh/known_hosts`` is used. An unknown or changed
  host key refuses the connection. ``host_key_checking: false`` exists for throw-away test
  servers only.
- Credentials: ``password`` and/or ``private_key`` (the key text, PEM/OpenSSH, from ``${VAR}``;
  a path to a key file also works). Neither ever appears in an error: errors name
  ``user@host:port`` and what went wrong.
- One SSH connection per listing and per opened file; the file object owns its connection and
  closes it. SFTP v3 mtimes have whole-second resolution, so size changes catch most writes in
  progress; use ``ready_marker`` when the sender can write one.
"""

from __future__ import annotations

import io
import posixpath
import stat
from pathlib import Path
from typing import BinaryIO

import dagster as dg
import paramiko

from audience_pipeline.redact import redact, register_secret
from audience_pipeline.sources.base import SourceFile, SourceUnavailable, check_name, select_files

_KEY_TYPES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)
_PREFETCH_REQUESTS = 256  # x 32 KiB in flight: full speed, ~8 MB buffered instead of the file


class _OwnedFile(io.RawIOBase):
    """An SFTP file that closes its SSH connection with it."""

    def __init__(self, handle: paramiko.SFTPFile, client: paramiko.SSHClient) -> None:
        self._handle = handle
        self._client = client

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._handle.read(len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            finally:
                self._client.close()
                super().close()


class SftpSourceResource(dg.ConfigurableResource):
    host: str
    port: int = 22
    username: str
    password: str | None = None
    private_key: str | None = None
    private_key_passphrase: str | None = None
    known_hosts: str | None = None
    host_key_checking: bool = True
    remote_dir: str = "."
    glob: str = "*.csv"
    ready_marker: str | None = None
    stable_after_seconds: float = 60.0
    move_processed_to: str | None = None
    timeout_seconds: float = 30.0

    def describe(self) -> str:
        return f"sftp {self._where()}:{self.remote_dir} ({self.glob})"

    def _where(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    def _pkey(self) -> paramiko.PKey | None:
        if not self.private_key:
            return None
        text = self.private_key
        if "-----BEGIN" not in text and Path(text).expanduser().is_file():
            text = Path(text).expanduser().read_text("utf-8")
        for key_type in _KEY_TYPES:
            try:
                return key_type.from_private_key(io.StringIO(text), password=self.private_key_passphrase)
            except paramiko.PasswordRequiredException:
                raise SourceUnavailable(
                    f"sftp {self._where()}: the private key needs private_key_passphrase"
                ) from None
            except (paramiko.SSHException, ValueError):
                continue
        raise SourceUnavailable(f"sftp {self._where()}: private_key is not an RSA, ECDSA or Ed25519 key")

    def _load_host_keys(self, client: paramiko.SSHClient) -> None:
        if not self.host_key_checking:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            return
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        value = (self.known_hosts or "").strip()
        if not value:
            client.load_system_host_keys()
            return
        if "\n" not in value and " " in value and not Path(value).expanduser().exists():
            first = value.split()[0]
            if first.startswith(("ssh-", "ecdsa-", "sk-")):
                host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
                value = f"{host} {value}"
            entry = paramiko.hostkeys.HostKeyEntry.from_line(value)
            if entry is None:
                raise SourceUnavailable(f"sftp {self._where()}: known_hosts line is not valid")
            for name in entry.hostnames:
                client.get_host_keys().add(name, entry.key.get_name(), entry.key)
            return
        path = Path(value).expanduser()
        if not path.is_file():
            raise SourceUnavailable(f"sftp {self._where()}: known_hosts file {path} does not exist")
        client.load_host_keys(str(path))

    def _connect(self) -> paramiko.SSHClient:
        register_secret(self.password, self.private_key, self.private_key_passphrase)
        client = paramiko.SSHClient()
        try:
            self._load_host_keys(client)
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                pkey=self._pkey(),
                timeout=self.timeout_seconds,
                banner_timeout=self.timeout_seconds,
                auth_timeout=self.timeout_seconds,
                channel_timeout=self.timeout_seconds,
                allow_agent=False,
                look_for_keys=False,
            )
        except SourceUnavailable:
            client.close()
            raise
        except paramiko.BadHostKeyException:
            client.close()
            raise SourceUnavailable(
                f"sftp {self._where()}: the server's host key does not match known_hosts; refused"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise SourceUnavailable(f"sftp {self._where()}: authentication failed") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise SourceUnavailable(f"sftp {self._where()}: {redact(_reason(exc))}") from None
        return client

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.remote_dir, *parts)

    def _processed_dir(self) -> str | None:
        return self._path(self.move_processed_to) if self.move_processed_to else None

    def list_files(self) -> list[SourceFile]:
        client = self._connect()
        try:
            sftp = client.open_sftp()
            entries = [
                (a.filename, a.st_size or 0, int(a.st_mtime or 0) * 1_000_000_000)
                for a in sftp.listdir_attr(self.remote_dir)
                if a.st_mode is not None and stat.S_ISREG(a.st_mode)
            ]
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SourceUnavailable(
                f"sftp {self._where()}: cannot list {self.remote_dir}: {redact(_reason(exc))}"
            ) from None
        finally:
            client.close()
        return select_files(entries, self.glob, self.ready_marker)

    def open(self, name: str) -> BinaryIO:
        check_name(name, self.describe())
        client = self._connect()
        try:
            sftp = client.open_sftp()
            candidates = [self._path(name)]
            if self._processed_dir():
                candidates.append(posixpath.join(self._processed_dir(), name))
            for path in candidates:
                try:
                    handle = sftp.open(path, "rb")
                except FileNotFoundError:
                    continue
                handle.prefetch(handle.stat().st_size, max_concurrent_requests=_PREFETCH_REQUESTS)
                return io.BufferedReader(_OwnedFile(handle, client), buffer_size=1 << 20)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise SourceUnavailable(
                f"sftp {self._where()}: cannot read {self._path(name)}: {redact(_reason(exc))}"
            ) from None
        client.close()
        raise FileNotFoundError(f"{name!r} is not a file in {self.describe()}")

    def processed_action(self) -> str | None:
        return f"move to {self._processed_dir()}" if self._processed_dir() else None

    def mark_processed(self, name: str) -> None:
        folder = self._processed_dir()
        if folder is None:
            return
        check_name(name, self.describe())
        client = self._connect()
        try:
            sftp = client.open_sftp()
            try:
                sftp.stat(folder)
            except FileNotFoundError:
                sftp.mkdir(folder)
            names = [name]
            if self.ready_marker:
                names += [f"{name}{self.ready_marker}", f"{posixpath.splitext(name)[0]}{self.ready_marker}"]
            for item in names:
                try:
                    sftp.posix_rename(self._path(item), posixpath.join(folder, item))
                except FileNotFoundError:
                    continue
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SourceUnavailable(
                f"sftp {self._where()}: cannot move {name} to {folder}: {redact(_reason(exc))}"
            ) from None
        finally:
            client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
