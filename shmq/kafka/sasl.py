"""SASL/PLAIN for the Kafka listener (SASL_PLAINTEXT, as Kafka's PlainLoginModule).

Credentials live in one file, ``<root>/kafka-users`` by default: one
``user:password`` per line (``#`` starts a comment). The file must belong to
the listener's user and be readable by nobody else (mode 0600 or 0400),
otherwise the listener refuses to start, naming the file and its mode.

A connection authenticates with SaslHandshake (v0: the PLAIN token then
comes as a bare frame; v1: inside SaslAuthenticate). Until it has, the
listener answers nothing but ApiVersions, SaslHandshake and
SaslAuthenticate; any other request gets SASL_AUTHENTICATION_FAILED and the
connection is closed. A failed authentication is answered with the error and
the connection closed, as Kafka does.
"""
from __future__ import annotations

import hmac
import os
import stat
from typing import Dict, Optional

from ..errors import ClusterAuthorizationFailed, InvalidConfig

__all__ = ["load_users", "SaslState", "MECHANISMS"]

MECHANISMS = ("PLAIN",)


def load_users(path: str) -> Dict[str, str]:
    """{user: password} from a credentials file owned by us and private."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidConfig(f"cannot open the Kafka listener's credentials file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ClusterAuthorizationFailed(
                f"credentials file {path} has owner uid {st.st_uid} and mode {stat.S_IMODE(st.st_mode):04o}; "
                f"it must belong to uid {os.geteuid()} and be readable by nobody else (chmod 600 {path})")
        with os.fdopen(fd, "r", encoding="utf-8", closefd=False) as f:
            text = f.read()
    finally:
        os.close(fd)
    users: Dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise InvalidConfig(f"{path} line {n}: expected user:password")
        users[user] = password
    if not users:
        raise InvalidConfig(f"{path} names no user (one user:password per line)")
    return users


class SaslState:
    """Authentication state of one connection (``users`` None: no SASL)."""

    def __init__(self, users: Optional[Dict[str, str]]) -> None:
        self.users = users
        self.authenticated = users is None
        self.mechanism: Optional[str] = None
        self.expect_raw_token = False
        self.failed = False
        self.user: Optional[str] = None

    def handshake(self, mechanism: str, version: int) -> int:
        """Error code for SaslHandshake (0, or 33 UNSUPPORTED_SASL_MECHANISM)."""
        if mechanism not in MECHANISMS:
            return 33
        if self.users is None or self.authenticated:
            return 34 if self.users is not None else 33   # ILLEGAL_SASL_STATE / no SASL configured
        self.mechanism = mechanism
        self.expect_raw_token = version == 0
        return 0

    def check_plain(self, token: bytes) -> bool:
        """Verify a PLAIN token: ``authzid \\0 user \\0 password``."""
        if self.users is None or self.mechanism != "PLAIN":
            return False
        parts = bytes(token).split(b"\x00")
        if len(parts) != 3:
            return False
        authz, user_b, pw_b = parts
        try:
            user, pw = user_b.decode(), pw_b.decode()
        except UnicodeDecodeError:
            return False
        expected = self.users.get(user)
        ok = expected is not None and hmac.compare_digest(expected.encode(), pw.encode()) and \
            (not authz or authz == user_b)
        if ok:
            self.authenticated, self.user = True, user
        else:
            self.failed = True
        return ok

    def raw_token(self, token: bytes) -> Optional[bytes]:
        """SaslHandshake v0 flow: the reply frame body, or None to close."""
        self.expect_raw_token = False
        return b"" if self.check_plain(token) else None
