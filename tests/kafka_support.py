"""Helpers for the Kafka listener tests: start ``python -m shmq.kafka`` on an
ephemeral port for a test's root, and stop it whatever happens."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Iterator, List, Optional, Tuple

from shmq.kafka.supervisor import stop_child

START_TIMEOUT = 30.0


class Listener:
    """A listener process for ``root`` (its stderr goes to ``<root>/kafka-listener.log``)."""

    def __init__(self, root: str, *extra: str) -> None:
        self.root = root
        self.log_path = os.path.join(root, "kafka-listener.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmq.kafka", "--root", root, "--listen", "127.0.0.1:0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line: List[str] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline() if self.proc.stdout else ""),
                             daemon=True)
        t.start()
        t.join(START_TIMEOUT)
        if not line or not line[0].startswith("listening on"):
            self.stop()
            raise RuntimeError(f"the Kafka listener did not start: {line!r}; log: {self.log()[-2000:]}")
        addr = line[0].split()[2]
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)
        self.bootstrap = f"{self.host}:{self.port}"

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self._log.close()


def stop_process(proc: "subprocess.Popen[str]", sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Send ``sig`` (SIGTERM: the listener's own helper), wait up to ``wait`` seconds, then SIGKILL."""
    if sig == signal.SIGTERM:
        stop_child(proc, wait)
    elif proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(wait)


def listener_for(root: str, *extra: str) -> Iterator[Listener]:
    """Generator for fixtures: a started listener, stopped at teardown."""
    ln = Listener(root, *extra)
    try:
        yield ln
    finally:
        ln.stop()


def frame(key: int, version: int, corr: int, body: bytes = b"", client_id: Optional[str] = "t") -> bytes:
    """A request frame with header v1 (non-flexible APIs and versions)."""
    import struct
    cid = b"\xff\xff" if client_id is None else struct.pack(">h", len(client_id)) + client_id.encode()
    payload = struct.pack(">hhi", key, version, corr) + cid + body
    return struct.pack(">i", len(payload)) + payload


def recv_frame(sock, timeout: float = 10.0) -> Tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """(correlation id, rest of the body) of one response."""
    import struct
    sock.settimeout(timeout)

    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            b = sock.recv(n - len(out))
            if not b:
                raise ConnectionError("closed")
            out += b
        return out
    (size,) = struct.unpack(">i", exact(4))
    body = exact(size)
    return struct.unpack(">i", body[:4])[0], body[4:]
