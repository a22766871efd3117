"""SASL/PLAIN on the Kafka listener: credentials from ``<root>/kafka-users``
(owner-only), right credentials work, wrong ones and none get nothing but the
authentication error."""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Iterator

import pytest

from kafka_support import Listener, frame, listener_for, recv_frame
from shmq.root import Root

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

TIMEOUT = 30.0


def _write_users(root: Root, text: str, mode: int = 0o600) -> None:
    fd = os.open(root.kafka_users_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(root.kafka_users_path, mode)


@pytest.fixture
def sasl_listener(root: Root) -> Iterator[Listener]:
    _write_users(root, "# user:password\nalice:s3cret\nbob:hunter2\n")
    yield from listener_for(root.path)


def _ck_conf(ln: Listener, user: str, password: str) -> dict:
    return {"bootstrap.servers": ln.bootstrap, "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
            "sasl.username": user, "sasl.password": password}


def test_right_credentials_work(sasl_listener: Listener) -> None:
    ck = pytest.importorskip("confluent_kafka")
    p = ck.Producer({**_ck_conf(sasl_listener, "alice", "s3cret"), "acks": "all"})
    for i in range(100):
        p.produce("secure", key=b"%d" % i, value=b"x")
    assert p.flush(TIMEOUT) == 0
    c = ck.Consumer({**_ck_conf(sasl_listener, "bob", "hunter2"), "group.id": "g", "auto.offset.reset": "earliest"})
    c.subscribe(["secure"])
    got = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < 100 and time.monotonic() < deadline:
        got += [m for m in c.consume(100, timeout=1.0) if m.error() is None]
    c.close()
    assert sorted(int(m.key()) for m in got) == list(range(100))
    kp = pytest.importorskip("kafka")
    kc = kp.KafkaConsumer(bootstrap_servers=sasl_listener.bootstrap, security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism="PLAIN", sasl_plain_username="alice", sasl_plain_password="s3cret")
    assert "secure" in kc.topics()
    kc.close()


def test_wrong_credentials_are_refused(sasl_listener: Listener) -> None:
    ck = pytest.importorskip("confluent_kafka")
    from confluent_kafka.admin import AdminClient
    admin = AdminClient(_ck_conf(sasl_listener, "alice", "wrong"))
    with pytest.raises(ck.KafkaException) as e:
        admin.list_topics(timeout=5)
    assert e.value.args[0].code() in (ck.KafkaError._AUTHENTICATION, ck.KafkaError._TRANSPORT,
                                      ck.KafkaError._TIMED_OUT, ck.KafkaError.SASL_AUTHENTICATION_FAILED)
    assert "authentication from" in sasl_listener.log() and "failed" in sasl_listener.log()


def test_unauthenticated_requests_get_only_the_error(sasl_listener: Listener) -> None:
    with socket.create_connection((sasl_listener.host, sasl_listener.port), timeout=10) as s:
        s.sendall(frame(18, 0, 1))                      # ApiVersions is answered before authentication
        corr, body = recv_frame(s)
        assert corr == 1 and struct.unpack(">h", body[:2])[0] == 0
        # Heartbeat v0 (group, generation, member): SASL_AUTHENTICATION_FAILED, then the connection closes.
        s.sendall(frame(12, 0, 2, struct.pack(">h", 1) + b"g" + struct.pack(">ih", 1, 1) + b"m"))
        corr, body = recv_frame(s)
        assert corr == 2 and struct.unpack(">h", body[:2])[0] == 58
        with pytest.raises((ConnectionError, OSError)):
            s.sendall(frame(18, 0, 3))
            recv_frame(s, timeout=5)
    with socket.create_connection((sasl_listener.host, sasl_listener.port), timeout=10) as s:
        # Metadata (no error field of its own): no answer at all, the connection closes.
        with pytest.raises((ConnectionError, OSError)):
            s.sendall(frame(3, 1, 4, struct.pack(">i", -1)))
            recv_frame(s, timeout=5)


def test_credentials_readable_by_others_are_refused(root: Root) -> None:
    _write_users(root, "alice:s3cret\n", mode=0o644)
    with pytest.raises(RuntimeError, match="did not start"):
        Listener(root.path)
    assert "readable by nobody else" in open(os.path.join(root.path, "kafka-listener.log")).read()
