"""The systems under test: shmq and its peers, behind one small interface.

Each ``Peer`` has a parent side (``setup`` makes the channel for one run --
a fresh shmq root and topic, a queue, a private redis-server -- and
``teardown`` removes it) and a child side (``producer`` / ``consumer`` open
the channel inside a fresh process and hand the benchmark loops in
``perf.suite`` the peer's own bound methods, so the loops measure the peer's
API, not an adapter).

Producer handle: ``sends`` (one callable per channel taking one value),
``batches`` (one callable per channel taking a batch: a 2-D uint8 array when
``batch_numpy`` else a list of bytes), ``close()``.

Consumer handle: ``recv(timeout)`` -> a message or None on timeout, where the
value is ``msg[unwrap]`` when ``unwrap`` is not None; ``recv_nowait()`` (None
when the peer has no non-blocking receive); ``recv_batch(timeout)`` -> a 2-D
uint8 array, a list of values, or None; ``requeue(value)`` puts an end marker
back for the other group member (shared-queue peers whose batch receive can
take two); ``close()``.
"""
from __future__ import annotations

import functools
import os
import queue as queue_mod
import shutil
import signal
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional

from .workloads import Workload

RECV_TIMEOUT = 0.1


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


class Handle:
    """A bag of callables (see the module doc)."""

    def __init__(self, **kw: Any) -> None:
        self.sends: List[Callable[[Any], Any]] = []
        self.batches: List[Callable[[Any], Any]] = []
        self.batch_numpy = False
        self.recv: Optional[Callable[[float], Any]] = None
        self.unwrap: Optional[int] = None
        self.recv_nowait: Optional[Callable[[], Any]] = None
        self.recv_batch: Optional[Callable[[float], Any]] = None
        self.requeue: Optional[Callable[[bytes], Any]] = None
        self.close: Callable[[], None] = lambda: None
        self.__dict__.update(kw)


class Peer:
    name = "?"
    label = "?"
    has_batch = False
    batch_api = ""
    single_api = ""
    group_note = ""
    count_scale = 1.0          # fraction of the workload's messages (slow peers)
    has_nowait = True          # a non-blocking receive (spinning consumer)
    server_name = ""            # a process of the system besides the clients (its CPU is counted)

    def check(self) -> Optional[str]:
        """None if the peer can run here, else why not."""
        return None

    def versions(self) -> Dict[str, str]:
        return {}

    def unsupported(self, w: Workload) -> Optional[str]:
        """None if the peer runs workload w, else why not."""
        if w.kind == "tput" and w.mode == "batch" and not self.has_batch:
            return "no batch API"
        return None

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        return {}

    def server_pids(self, env: Dict[str, Any]) -> List[int]:
        return []

    def teardown(self, env: Dict[str, Any]) -> None:
        pass

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        raise NotImplementedError

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        raise NotImplementedError


# ----------------------------------------------------------------- shmq

def _pow2ceil(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class Shmq(Peer):
    name = "shmq"
    label = "shmq"
    has_batch = True
    single_api = "Producer.send / Consumer.poll"
    batch_api = "Producer.send_batch(2-D uint8) / Consumer.consume_arrays"
    group_note = ("2-partition topic, each consumer assign()ed one partition, producer alternates partitions "
                  "(group membership arrives in a later issue)")
    server_name = "coordinator"

    def versions(self) -> Dict[str, str]:
        import shmq
        return {"shmq": shmq.__version__}

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        from shmq.admin import Admin
        root = os.path.join(tmp, "root")
        parts = w.consumers
        per_part = (w.count + parts - 1) // parts
        frame = (8 + 61 + 3 + 8 + w.size + 7) & ~7 if w.mode == "single" or w.kind == "lat" else w.size + 24
        need = int(per_part * frame * 1.15) + (w.batch * w.size + (1 << 20)) * 4
        seg = min(64 << 20, max(2 << 20, _pow2ceil(need // 4)))
        seg = max(seg, _pow2ceil(w.batch * (w.size + 32) + (64 << 10)))
        count = max(2, min(1024, need // seg + 2))
        admin = Admin(root)
        try:
            admin.create_topic("bench", parts, {"segment_bytes": seg, "segment_count": count,
                                                "overflow": "overwrite"})
        finally:
            admin.close()
        return {"root": root, "topic": "bench", "partitions": parts, "segment_bytes": seg, "segment_count": count}

    def server_pids(self, env: Dict[str, Any]) -> List[int]:
        pid = coordinator_pid(env["root"])
        return [pid] if pid else []

    def teardown(self, env: Dict[str, Any]) -> None:
        kill_coordinator(env["root"])
        shutil.rmtree(env["root"], ignore_errors=True)

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        from shmq.producer import Producer
        p = Producer(env["root"])
        topic = env["topic"]
        send, send_batch = p.send, p.send_batch
        if env["partitions"] == 1:
            # What a user of a one-partition topic writes, send(topic, value):
            # a positional-only partial keeps the C send's vectorcall (a
            # partial with a keyword goes through tp_call and a kwargs dict
            # on every message). The partitioner puts every record in
            # partition 0, as partition=0 did.
            return Handle(sends=[functools.partial(send, topic)], batches=[functools.partial(send_batch, topic)],
                          batch_numpy=True, close=p.close)

        def sender(k: int) -> Any:
            def send_to(value: bytes) -> Any:      # send(topic, value, partition=k), as a user's loop calls it
                return send(topic, value, partition=k)
            return send_to

        def batcher(k: int) -> Any:
            def send_batch_to(values: Any) -> Any:
                return send_batch(topic, values, partition=k)
            return send_batch_to
        parts = range(env["partitions"])
        return Handle(sends=[sender(k) for k in parts], batches=[batcher(k) for k in parts], batch_numpy=True,
                      close=p.close)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        from shmq.consumer import Consumer
        from shmq.message import TopicPartition
        c = Consumer(group_id="bench", root=env["root"], auto_offset_reset="earliest", enable_auto_commit=False,
                     max_poll_records=8192)
        c.assign([TopicPartition(env["topic"], idx if w.consumers > 1 else 0)])
        poll = c.poll
        consume_arrays = c.consume_arrays
        rows = max(8192, w.batch)

        def recv_batch(timeout: float) -> Any:
            got = consume_arrays(rows, timeout)
            return None if got is None else got[1].values

        return Handle(recv=poll, unwrap=4, recv_nowait=functools.partial(poll, 0.0), recv_batch=recv_batch,
                      close=c.close)


def coordinator_pid(root: str) -> Optional[int]:
    """The pid of the live coordinator of ``root`` (pid and create time must match)."""
    import psutil
    try:
        with open(os.path.join(root, "coordinator.pid")) as f:
            pid_s, ctime_s = f.read().split()
        pid, ctime = int(pid_s), float(ctime_s)
        if abs(psutil.Process(pid).create_time() - ctime) < 0.01:
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def kill_coordinator(root: str, timeout: float = 5.0) -> None:
    """Stop the embedded coordinator this run started on ``root`` (SIGTERM, then SIGKILL)."""
    import psutil
    pid = coordinator_pid(root)
    if pid is None:
        return
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    except psutil.Error:
        pass


# ------------------------------------------------------ multiprocessing

class MpQueue(Peer):
    name = "mp.Queue"
    label = "mp.Queue"
    single_api = "put / get"

    def versions(self) -> Dict[str, str]:
        return {}

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        return {"q": ctx.Queue()}

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        q = env["q"]

        def close() -> None:
            q.close()
            q.join_thread()
        return Handle(sends=[q.put], close=close)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        q = env["q"]
        get, get_nowait, Empty = q.get, q.get_nowait, queue_mod.Empty

        def recv(timeout: float) -> Any:
            try:
                return get(True, timeout)
            except Empty:
                return None

        def recv_nowait() -> Any:
            try:
                return get_nowait()
            except Empty:
                return None
        return Handle(recv=recv, recv_nowait=recv_nowait, requeue=q.put)


class MpPipe(Peer):
    name = "mp.Pipe"
    label = "mp.Pipe"
    single_api = "send_bytes / recv_bytes"
    group_note = "one pipe per consumer, producer alternates"

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        # one pipe per (producer, consumer) pair: a pipe has one writer and one reader
        pipes = {}
        for p in range(w.producers):
            for c in range(w.consumers):
                pipes[(p, c)] = ctx.Pipe(duplex=False)   # (reader, writer)
        return {"pipes": pipes}

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        ws = [env["pipes"][(idx, c)][1] for c in range(w.consumers)]
        return Handle(sends=[c.send_bytes for c in ws], close=lambda: [c.close() for c in ws] and None)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        from multiprocessing.connection import wait
        rs = [env["pipes"][(p, idx)][0] for p in range(w.producers)]
        if len(rs) == 1:
            r = rs[0]
            poll, recv_bytes = r.poll, r.recv_bytes

            def recv(timeout: float) -> Any:
                return recv_bytes() if poll(timeout) else None

            def recv_nowait() -> Any:
                return recv_bytes() if poll() else None
        else:
            live = list(rs)
            ready: List[Any] = []

            def recv(timeout: float) -> Any:
                while True:
                    while ready:
                        c = ready.pop()
                        try:
                            return c.recv_bytes()
                        except EOFError:
                            live.remove(c)
                    if not live:
                        return None
                    got = wait(live, timeout)
                    if not got:
                        return None
                    ready.extend(got)

            def recv_nowait() -> Any:
                return recv(0.0)
        return Handle(recv=recv, recv_nowait=recv_nowait)


# ------------------------------------------------------------ faster-fifo

class FasterFifo(Peer):
    name = "faster-fifo"
    label = "faster-fifo"
    has_batch = True
    single_api = "put / get (pickled)"
    batch_api = "put_many / get_many"
    QUEUE_BYTES = 64 << 20

    def check(self) -> Optional[str]:
        try:
            import faster_fifo  # noqa: F401
        except ImportError as e:
            return f"faster-fifo not installed ({e}); pip install 'shmq[bench]'"
        return None

    def versions(self) -> Dict[str, str]:
        return {"faster-fifo": _version("faster-fifo") or "?"}

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        import faster_fifo
        return {"q": faster_fifo.Queue(max_size_bytes=self.QUEUE_BYTES)}

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        q = env["q"]
        put, put_many = q.put, q.put_many
        return Handle(sends=[functools.partial(put, timeout=60.0)],
                      batches=[functools.partial(put_many, timeout=60.0)])

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        q = env["q"]
        get, get_many, Empty = q.get, q.get_many, queue_mod.Empty
        rows = max(1, w.batch)

        def recv(timeout: float) -> Any:
            try:
                return get(True, timeout)
            except Empty:
                return None

        def recv_nowait() -> Any:
            try:
                return get(False)
            except Empty:
                return None

        def recv_batch(timeout: float) -> Any:
            try:
                return get_many(True, timeout, rows)
            except Empty:
                return None
        return Handle(recv=recv, recv_nowait=recv_nowait, recv_batch=recv_batch, requeue=q.put)


# ----------------------------------------------------------------- pyzmq

class Zmq(Peer):
    name = "pyzmq"
    label = "pyzmq"
    has_batch = True
    single_api = "PUSH.send / PULL.recv, ipc://"
    batch_api = "send_multipart / recv_multipart (one frame per message)"
    group_note = "PUSH round-robins to 2 PULL sockets"

    def check(self) -> Optional[str]:
        try:
            import zmq  # noqa: F401
        except ImportError as e:
            return f"pyzmq not installed ({e}); pip install 'shmq[bench]'"
        return None

    def versions(self) -> Dict[str, str]:
        import zmq
        return {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        return {"addr": f"ipc://{tmp}/zmq.sock"}

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import zmq
        zctx = zmq.Context()
        s = zctx.socket(zmq.PUSH)
        if w.consumers > 1:
            s.bind(env["addr"])
        else:
            s.connect(env["addr"])

        def close() -> None:
            s.close(linger=30_000)
            zctx.term()
        return Handle(sends=[s.send], batches=[s.send_multipart], close=close)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import zmq
        zctx = zmq.Context()
        s = zctx.socket(zmq.PULL)
        if w.consumers > 1:
            s.connect(env["addr"])
        else:
            s.bind(env["addr"])
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN)
        recv, recv_multipart, NOBLOCK, Again = s.recv, s.recv_multipart, zmq.NOBLOCK, zmq.Again

        def recv1(timeout: float) -> Any:
            try:
                return recv(NOBLOCK)
            except Again:
                pass
            if poller.poll(int(timeout * 1000)):
                return recv()
            return None

        def recv_nowait() -> Any:
            try:
                return recv(NOBLOCK)
            except Again:
                return None

        def recv_batch(timeout: float) -> Any:
            try:
                return recv_multipart(NOBLOCK)
            except Again:
                pass
            if poller.poll(int(timeout * 1000)):
                return recv_multipart()
            return None

        def close() -> None:
            s.close(linger=0)
            zctx.term()
        return Handle(recv=recv1, recv_nowait=recv_nowait, recv_batch=recv_batch, close=close)


# ------------------------------------------------------------- posix_ipc

def _mq_limit(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/fs/mqueue/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


class PosixMQ(Peer):
    name = "posix_ipc"
    label = "posix_ipc MQ"
    single_api = "MessageQueue.send / receive"

    def check(self) -> Optional[str]:
        try:
            import posix_ipc  # noqa: F401
        except ImportError as e:
            return f"posix_ipc not installed ({e})"
        return None

    def versions(self) -> Dict[str, str]:
        import posix_ipc
        return {"posix_ipc": posix_ipc.VERSION, "mq_msg_max": str(_mq_limit("msg_max", 10)),
                "mq_msgsize_max": str(_mq_limit("msgsize_max", 8192))}

    def unsupported(self, w: Workload) -> Optional[str]:
        why = super().unsupported(w)
        if why:
            return why
        limit = _mq_limit("msgsize_max", 8192)
        if w.size > limit:
            return f"message of {w.size} B exceeds /proc/sys/fs/mqueue/msgsize_max={limit}"
        return None

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        import posix_ipc
        name = f"/shmq-bench-{os.getpid()}-{os.path.basename(tmp)}"
        mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600, max_messages=_mq_limit("msg_max", 10),
                                    max_message_size=max(w.size, 64))
        mq.close()
        return {"name": name}

    def teardown(self, env: Dict[str, Any]) -> None:
        import posix_ipc
        try:
            posix_ipc.unlink_message_queue(env["name"])
        except posix_ipc.ExistentialError:
            pass

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import posix_ipc
        mq = posix_ipc.MessageQueue(env["name"])
        return Handle(sends=[mq.send], close=mq.close)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import posix_ipc
        mq = posix_ipc.MessageQueue(env["name"])
        receive, Busy = mq.receive, posix_ipc.BusyError

        def recv(timeout: float) -> Any:
            try:
                return receive(timeout)
            except Busy:
                return None

        def recv_nowait() -> Any:
            try:
                return receive(0)
            except Busy:
                return None
        return Handle(recv=recv, unwrap=0, recv_nowait=recv_nowait, requeue=mq.send, close=mq.close)


# --------------------------------------------------------- Redis Streams

class RedisStreams(Peer):
    name = "redis"
    label = "Redis Streams"
    has_batch = True
    single_api = "XADD per message / XREAD COUNT 512"
    batch_api = "pipelined XADD / XREAD COUNT 512"
    group_note = "XREADGROUP NOACK, 2 consumers in one group"
    server_name = "redis-server"
    has_nowait = False
    count_scale = 0.2
    READ_COUNT = 512

    def check(self) -> Optional[str]:
        try:
            import redis  # noqa: F401
        except ImportError as e:
            return f"redis (python client) not installed ({e}); pip install 'shmq[bench]'"
        if not shutil.which("redis-server"):
            return "redis-server not installed (apt-get install redis-server)"
        return None

    def versions(self) -> Dict[str, str]:
        out = {"redis-py": _version("redis") or "?"}
        try:
            v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
            out["redis-server"] = v.split("v=")[1].split()[0] if "v=" in v else v.strip()
        except Exception:
            out["redis-server"] = "?"
        return out

    def setup(self, w: Workload, tmp: str, ctx: Any) -> Dict[str, Any]:
        import redis
        sock = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
                                 "--save", "", "--appendonly", "no", "--dir", tmp, "--daemonize", "no",
                                 "--loglevel", "warning"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"sock": sock, "pid": proc.pid, "stream": "bench", "group": "g"}
        self._procs = getattr(self, "_procs", {})
        self._procs[proc.pid] = proc
        deadline = time.monotonic() + 10
        while True:
            try:
                r = redis.Redis(unix_socket_path=sock)
                r.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.teardown(env)
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.01)
        if w.consumers > 1:
            r.xgroup_create("bench", "g", id="0", mkstream=True)
        r.close()
        return env

    def server_pids(self, env: Dict[str, Any]) -> List[int]:
        return [env["pid"]]

    def teardown(self, env: Dict[str, Any]) -> None:
        proc = getattr(self, "_procs", {}).pop(env["pid"], None)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def producer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import redis
        r = redis.Redis(unix_socket_path=env["sock"])
        stream = env["stream"]
        xadd = r.xadd

        def send(v: bytes) -> Any:
            return xadd(stream, {"v": v})

        def send_batch(vals: List[bytes]) -> Any:
            pipe = r.pipeline(transaction=False)
            for v in vals:
                pipe.xadd(stream, {"v": v})
            return pipe.execute()
        return Handle(sends=[send], batches=[send_batch], close=r.close)

    def consumer(self, env: Dict[str, Any], w: Workload, idx: int) -> Handle:
        import redis
        r = redis.Redis(unix_socket_path=env["sock"])
        stream, count = env["stream"], self.READ_COUNT
        state = {"last": b"0"}
        group = w.consumers > 1
        xread, xreadgroup, name = r.xread, r.xreadgroup, f"c{idx}"

        def recv_batch(timeout: float) -> Any:
            ms = max(1, int(timeout * 1000)) if timeout > 0 else None
            if group:
                got = xreadgroup(env["group"], name, {stream: ">"}, count=count, block=ms, noack=True)
            else:
                got = xread({stream: state["last"]}, count=count, block=ms)
            if not got:
                return None
            entries = got[0][1]
            if not entries:
                return None
            state["last"] = entries[-1][0]
            return [e[1][b"v"] for e in entries]

        def requeue(v: bytes) -> Any:
            return r.xadd(stream, {"v": v})
        return Handle(recv_batch=recv_batch, requeue=requeue, close=r.close)


PEERS: Dict[str, Peer] = {p.name: p for p in (Shmq(), MpQueue(), MpPipe(), FasterFifo(), Zmq(), RedisStreams(),
                                                 PosixMQ())}
