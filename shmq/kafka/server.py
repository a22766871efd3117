"""The Kafka listener: a TCP server speaking Kafka's protocol to a root's logs.

Theory of operation: one process, one accept loop, one thread per client
connection (Kafka clients open a handful: bootstrap, one per broker, one to
the group coordinator). A connection thread reads a request, answers it and
reads the next, so responses leave in request order as Kafka requires, and a
Fetch that waits for data simply sleeps in the C core's futex wait (the GIL is
released) without holding anyone else up. Produce appends the client's
RecordBatch as it is into the partition log (``append_raw``: only baseOffset
is rewritten, after the claim, and Kafka's CRC does not cover it); Fetch
returns the stored batches as they are. Metadata and topic administration go
to the coordinator over its socket; committed offsets go through the shared
offsets table like native consumers'; groups are proxied into the
coordinator's group logic (``groups.py``), so Kafka clients and
``shmq.Consumer`` share groups.

Follower reads (KIP-392): the listener is node 0, leader of every
partition. A replica process that is some topic's follower in a rack
(topic config ``replica_racks``) also gets a broker of its own in Metadata,
node ``REPLICA_NODE_BASE + replica id``, served by this same process on a
port of its own (bound the first time it is named), so that a Fetch there
can be told from one sent to the leader: a client that sends a rack is
answered ``preferred_read_replica`` by node 0 when an in-sync follower of
that rack exists, and its Fetch to that node is served from that replica's
log, never above the high watermark (``api_data.fetch``).

Robustness: a frame whose size is negative, too small or above
``max_request_bytes``, that arrives truncated, or that does not parse closes
that one connection with a log line; every other failure of a request is
answered with Kafka's error code for it. Nothing a client sends can stop the
accept loop.

Shared state and its invariants: ``Cluster`` (logs, metadata view) and the
coordinator client are thread-safe; ``GroupProxy`` and the producer-state
tables have their own locks. Per-connection state (readers, SASL state) is
touched only by the connection's thread.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..cluster import Cluster
from ..errors import ShmqError
from ..root import Root
from . import api_admin, api_data, api_groups
from .codec import (API_NAMES, SUPPORTED, ProtocolError, api_versions_error_frame, bare_error_frame,
                    decode_request, encode_response, error_code_for, error_response, has_error_code,
                    peek_header)
from .groups import GroupProxy
from .sasl import SaslState, load_users

__all__ = ["KafkaListener", "DEFAULT_PORT"]

log = logging.getLogger("shmq.kafka")

DEFAULT_PORT = 9092
MAX_REQUEST_BYTES = 100 * 1024 * 1024        # Kafka's socket.request.max.bytes
BODY_TIMEOUT = 30.0                           # a started frame must arrive within this
IDLE_TIMEOUT = 600.0                          # Kafka's connections.max.idle.ms
REPLICA_NODE_BASE = 1000                      # node id of replica r's follower-read broker: 1000 + r
SASL_AUTHENTICATION_FAILED = 58
ILLEGAL_SASL_STATE = 34

Handler = Callable[["Connection", Any, int], Optional[Dict[str, Any]]]
HANDLERS: Dict[int, Handler] = {**api_admin.HANDLERS, **api_data.HANDLERS, **api_groups.HANDLERS}
# Before a SASL client authenticates, only these APIs are answered.
_PRE_AUTH = (17, 18, 36)


class KafkaListener:
    """Serves the Kafka protocol on ``host:port`` for the root ``root``.

    ``port=0`` binds an ephemeral port (``address`` tells which). With
    ``sasl_users`` (a credentials file, see ``shmq.kafka.sasl``) or a
    ``kafka-users`` file in the root, every client must authenticate with
    SASL/PLAIN first. ``auto_create_topics``: Metadata and Produce for a
    missing topic create it with ``default_partitions`` partitions, as Kafka's
    ``auto.create.topics.enable`` (on by default there too).
    """

    def __init__(self, root: Any = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 advertised_host: Optional[str] = None, sasl_users: Optional[str] = None,
                 auto_create_topics: bool = True, default_partitions: int = 1,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.root = Root(root)
        self.cluster = Cluster(self.root)
        users_path = sasl_users or (self.root.kafka_users_path if os.path.exists(self.root.kafka_users_path)
                                    else None)
        self.users = load_users(users_path) if users_path else None
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.max_request_bytes = max_request_bytes
        self.node_id = 0
        digest = hashlib.sha256(self.root.path.encode()).digest()[:16]
        self.cluster_id = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self.host, self.port = self._sock.getsockname()[:2]
        self.advertised_host = advertised_host or (socket.gethostname() if host in ("0.0.0.0", "::") else host)
        self._bind_host = host
        self._replica_socks: Dict[int, socket.socket] = {}      # replica id -> its follower-read socket
        self.replica_ports: Dict[int, int] = {}
        self.groups = GroupProxy(self)
        self.pstates = api_data.ProducerStates()
        self._closed = False
        self._conns: Dict[int, "Connection"] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self.port

    def serve_forever(self) -> None:
        """Accept and serve connections until ``close``."""
        self.groups.start()
        self._accept(self._sock, None)

    def _accept(self, sock: socket.socket, replica: Optional[int]) -> None:
        while not self._closed:
            try:
                s, peer = sock.accept()
            except OSError:
                if self._closed:
                    break
                time.sleep(0.01)       # e.g. EMFILE: keep serving the others
                continue
            conn = Connection(self, s, peer, replica)
            conn.thread = threading.Thread(target=conn.run, name=f"kafka-{peer[0]}:{peer[1]}", daemon=True)
            with self._lock:
                self._conns[id(conn)] = conn
            conn.thread.start()

    def replica_node(self, replica: int) -> int:
        """The node id of ``replica``'s follower-read broker, its port bound now if it is not yet."""
        if replica not in self.replica_ports:
            with self._lock:
                if replica not in self.replica_ports and not self._closed:
                    sock = socket.socket(self._sock.family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((self._bind_host, 0))
                    sock.listen(128)
                    self._replica_socks[replica] = sock
                    self.replica_ports[replica] = sock.getsockname()[1]
                    threading.Thread(target=self._accept, args=(sock, replica), name=f"kafka-accept-r{replica}",
                                     daemon=True).start()
                    log.info("kafka listener: follower reads of replica %d on port %d (node %d)", replica,
                             self.replica_ports[replica], REPLICA_NODE_BASE + replica)
        return REPLICA_NODE_BASE + replica

    def brokers(self) -> List[Dict[str, Any]]:
        """Metadata's broker list: node 0, then the follower-read brokers bound so far."""
        out = [{"node_id": self.node_id, "host": self.advertised_host, "port": self.port, "rack": None}]
        with self._lock:
            ports = sorted(self.replica_ports.items())
        for r, port in ports:
            out.append({"node_id": REPLICA_NODE_BASE + r, "host": self.advertised_host, "port": port, "rack": None})
        return out

    def start(self) -> "KafkaListener":
        """Serve in a background thread (tests, embedding)."""
        threading.Thread(target=self.serve_forever, name="kafka-accept", daemon=True).start()
        return self

    def forget(self, conn: "Connection") -> None:
        with self._lock:
            self._conns.pop(id(conn), None)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks = [self._sock, *self._replica_socks.values()]
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            c.shutdown()
        self.groups.close()
        # The logs are unmapped only once no connection thread can be using them
        # (a Fetch may be asleep in the C wait for up to its max_wait_ms).
        deadline = time.monotonic() + 5.0
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        if all(c.thread is None or not c.thread.is_alive() for c in conns):
            self.pstates.close()
            self.cluster.close()


class Connection:
    """One client connection: reads requests and answers them in order."""

    def __init__(self, listener: KafkaListener, sock: socket.socket, peer: Tuple[Any, ...],
                 replica: Optional[int] = None) -> None:
        self.listener = listener
        self.replica = replica             # a follower-read broker's connection: that replica's id
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.client_id = ""
        self.sasl = SaslState(listener.users)
        self.data = api_data.ConnectionData(listener)
        self.thread: Optional[threading.Thread] = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -------------------------------------------------------------- framing
    def _recv_exact(self, n: int) -> Optional[bytes]:
        chunks = []
        while n:
            b = self.sock.recv(min(n, 1 << 20))
            if not b:
                return None
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def _read_frame(self) -> Optional[bytes]:
        self.sock.settimeout(IDLE_TIMEOUT)
        head = self._recv_exact(4)
        if head is None:
            return None
        (size,) = struct.unpack(">i", head)
        if size < 8 or size > self.listener.max_request_bytes:
            raise ProtocolError(f"request size {size} is outside [8, {self.listener.max_request_bytes}]")
        self.sock.settimeout(BODY_TIMEOUT)
        frame = self._recv_exact(size)
        if frame is None:
            raise ProtocolError(f"connection closed in the middle of a {size}-byte request")
        return frame

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        try:
            while True:
                frame = self._read_frame()
                if frame is None:
                    break
                if not self.handle(frame):
                    break
        except ProtocolError as e:
            log.warning("kafka listener: closing connection from %s (%s): %s", self.peer,
                        self.client_id or "no client id", e)
        except socket.timeout:
            log.info("kafka listener: closing idle or stalled connection from %s", self.peer)
        except OSError as e:
            log.debug("kafka listener: connection from %s: %s", self.peer, e)
        except Exception:
            log.exception("kafka listener: connection from %s failed", self.peer)
        finally:
            self.shutdown()
            self.data.close()
            self.listener.forget(self)

    def shutdown(self) -> None:
        """Close the socket (the thread's blocked recv returns); the
        connection's own thread closes its readers when it ends."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def handle(self, frame: bytes) -> bool:
        """Answer one request; False to close the connection."""
        if self.sasl.expect_raw_token:          # SaslHandshake v0: the token comes bare
            reply = self.sasl.raw_token(frame)
            if reply is None:
                log.warning("kafka listener: SASL authentication from %s failed", self.peer)
                return False
            self.send(struct.pack(">i", len(reply)) + reply)
            return True
        key, version, corr = peek_header(frame)
        if key == 18 and version > SUPPORTED[18][1]:
            self.send(api_versions_error_frame(corr))
            return True
        rng = SUPPORTED.get(key)
        if rng is None or not rng[0] <= version <= rng[1]:
            return self._refuse(frame, key, version, corr, 35)
        if not self.sasl.authenticated and key not in _PRE_AUTH:
            # Nothing but the error: answered where the response has an error code
            # of its own, otherwise the connection just closes (as Kafka does).
            log.warning("kafka listener: %s sent %s before authenticating; refused", self.peer,
                        API_NAMES.get(key, key))
            if has_error_code(key, version):
                self._refuse(frame, key, version, corr, SASL_AUTHENTICATION_FAILED)
            return False
        header, req = decode_request(frame, key, version)
        self.client_id = header.client_id or self.client_id
        try:
            body = HANDLERS[key](self, req, version)
        except ShmqError as e:
            log.info("kafka listener: %s v%d from %s: %s", API_NAMES[key], version, self.peer, e)
            body = error_response(key, version, error_code_for(e))
        except ProtocolError:
            raise
        except Exception:
            log.exception("kafka listener: %s v%d from %s failed", API_NAMES[key], version, self.peer)
            body = error_response(key, version, -1)
        if body is None:                       # Produce with acks=0: no response at all
            return True
        self.send(encode_response(key, version, corr, body))
        return not self.sasl.failed

    def _refuse(self, frame: bytes, key: int, version: int, corr: int, code: int) -> bool:
        """Answer a request we do not serve with ``code`` in its own response
        shape when kio knows it, else in a bare header + error code."""
        try:
            decode_request(frame, key, version)
            self.send(encode_response(key, version, corr, error_response(key, version, code)))
        except Exception:
            self.send(bare_error_frame(corr, code))
        log.info("kafka listener: %s v%d from %s answered with error %d", API_NAMES.get(key, f"API {key}"),
                 version, self.peer, code)
        return True
