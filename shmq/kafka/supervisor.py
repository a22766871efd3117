"""The Kafka listener as a root setting, run by the active coordinator.

``<root>/kafka-listener.json`` (written by ``shmq kafka enable HOST:PORT``,
removed by ``shmq kafka disable``) asks for a listener; ``shmq serve --kafka
HOST:PORT`` asks for one without writing the setting. The active coordinator
(embedded or ``shmq serve``) runs a ``ListenerSupervisor`` thread that keeps
exactly one such listener alive: it starts ``python -m shmq.kafka --supervised``
as its child, starts it again if it dies (after a back-off), stops it when
the setting goes away or the coordinator stops.

Exactly one: a supervised listener holds the flock on
``<root>/kafka-listener.lock`` while it serves. A coordinator that finds the
lock held (the listener of a coordinator that was killed, which keeps serving
and reconnects to its successor) adopts it instead of starting another; a
listener that cannot take the lock exits at once.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Dict, Optional

from ..errors import InvalidConfig
from ..root import Root

__all__ = ["ListenerSupervisor", "read_setting", "write_setting", "remove_setting", "take_lock"]

log = logging.getLogger("shmq.kafka.supervisor")

CHECK_S = 1.0
IDLE_CHECK_S = 5.0          # no listener wanted: look for a new setting this often (idle coordinators stay idle)
RESTART_BACKOFF_S = 2.0


def read_setting(root: Root) -> Optional[Dict[str, Any]]:
    """The listener setting of ``root`` ({"listen": "HOST:PORT", "advertise": ...}), or None."""
    try:
        fd = os.open(root.kafka_setting_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        try:
            d = json.load(f)
        except ValueError as e:
            raise InvalidConfig(f"{root.kafka_setting_path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("listen"), str):
        raise InvalidConfig(f"{root.kafka_setting_path} must hold an object with a \"listen\" HOST:PORT string")
    return d


def write_setting(root: Root, listen: str, advertise: Optional[str] = None) -> Dict[str, Any]:
    from .__main__ import parse_address
    host, port = parse_address(listen)
    from ..coordinator.journal import _write_atomic
    d = {"listen": f"{host}:{port}", "advertise": advertise}
    _write_atomic(root.kafka_setting_path, json.dumps(d).encode())
    return d


def remove_setting(root: Root) -> bool:
    try:
        os.unlink(root.kafka_setting_path)
        return True
    except FileNotFoundError:
        return False


def take_lock(root: Root) -> Optional[int]:
    """The supervised listener's flock (an fd to keep open), or None if another holds it."""
    fd = os.open(root.kafka_lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class ListenerSupervisor:
    """Keeps the root's supervised listener alive (see the module doc).

    ``listen`` overrides the setting file (``shmq serve --kafka``)."""

    def __init__(self, root: Root, listen: Optional[str] = None, advertise: Optional[str] = None) -> None:
        self.root = root
        self.override = None if listen is None else {"listen": listen, "advertise": advertise}
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.wanted: Optional[Dict[str, Any]] = None
        self._started = -1e9
        self._stepped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmq-kafka-supervisor", daemon=True)

    def start(self) -> "ListenerSupervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._terminate()

    # ---------------------------------------------------------------- loop
    def _desired(self) -> Optional[Dict[str, Any]]:
        if self.override is not None:
            return self.override
        try:
            return read_setting(self.root)
        except InvalidConfig as e:
            log.error("Kafka listener setting ignored: %s", e)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                log.exception("Kafka listener supervision failed; retrying")
            self._stop.wait(CHECK_S if self.wanted is not None or self.proc is not None else IDLE_CHECK_S)

    def _step(self) -> None:
        want = self._desired()
        mine = self.proc is not None and self.proc.poll() is None
        # A listener found at the first step is adopted as it is, unless none is wanted.
        if (want != self.wanted and self._stepped) or (want is None and not self._stepped):
            if mine:
                log.info("Kafka listener setting changed (%s -> %s): stopping pid %d", self.wanted, want,
                         self.proc.pid)
                self._terminate()
                mine = False
            elif self._lock_held():
                self._stop_adopted()      # a killed coordinator's listener, started with the old setting
        self.wanted = want
        self._stepped = True
        if want is None or mine:
            return
        if self.proc is not None:
            log.warning("Kafka listener pid %d exited with status %s", self.proc.pid, self.proc.returncode)
            self.proc = None
        if time.monotonic() - self._started < RESTART_BACKOFF_S or self._lock_held():
            return                                   # backing off, or another coordinator's listener serves
        self._spawn(want)

    def _lock_held(self) -> bool:
        from ..coordinator.client import lock_held
        path = self.root.kafka_lock_path
        return os.path.exists(path) and lock_held(path)     # no file made in roots without a listener

    def _stop_adopted(self) -> None:
        """SIGTERM the supervised listener this coordinator did not start (the
        lock holder named in the lock file, if it is a supervised listener of this root)."""
        import psutil
        try:
            with open(self.root.kafka_lock_path) as f:
                pid = int(f.read().strip() or 0)
            cmd = psutil.Process(pid).cmdline()
        except (OSError, ValueError, psutil.Error):
            return
        if "shmq.kafka" in cmd and "--supervised" in cmd and self.root.path in cmd:
            log.info("Kafka listener setting changed: stopping the listener pid %d started before", pid)
            os.kill(pid, signal.SIGTERM)

    def _spawn(self, want: Dict[str, Any]) -> None:
        from ..spawn import CHILD_CWD, child_env, python_argv
        args = ["--root", self.root.path, "--listen", want["listen"], "--supervised"]
        if want.get("advertise"):
            args += ["--advertise", str(want["advertise"])]
        fd = os.open(self.root.kafka_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            self.proc = subprocess.Popen(python_argv("shmq.kafka", *args), stdin=subprocess.DEVNULL, stdout=fd,
                                         stderr=fd, close_fds=True, cwd=CHILD_CWD, env=child_env())
        finally:
            os.close(fd)
        self._started = time.monotonic()
        log.info("started the Kafka listener on %s (pid %d)", want["listen"], self.proc.pid)

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc)


def stop_child(proc: "subprocess.Popen[Any]", wait: float = 10.0) -> None:
    """SIGTERM a child process, SIGKILL it if it is still there after ``wait`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
