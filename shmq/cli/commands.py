"""`shmq` subcommands that talk to a root: serve, topics, produce, consume, groups, status.

Each command is one function taking the parsed arguments and returning an
exit status; output goes to stdout, errors to stderr as one line naming what
was wrong (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional


def _config_pairs(pairs: Optional[List[str]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise SystemExit(f"shmq: --config takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out


def serve(args: argparse.Namespace) -> int:
    from ..coordinator.__main__ import main as coordinator_main
    argv = ["--root", args.root] if args.root else []
    if args.standby:
        argv.append("--standby")
    if args.idle_exit_ms:
        argv += ["--idle-exit-ms", str(args.idle_exit_ms)]
    if args.kafka:
        argv += ["--kafka", args.kafka] + (["--kafka-advertise", args.kafka_advertise] if args.kafka_advertise else [])
    return coordinator_main(argv)


def kafka(args: argparse.Namespace) -> int:
    """``shmq kafka enable HOST:PORT | disable | status``: the root's Kafka listener setting,
    acted on by the active coordinator within 5 seconds."""
    from ..root import Root
    from ..kafka.supervisor import read_setting, remove_setting, write_setting
    root = Root(args.root)
    if args.action == "enable":
        if not args.address:
            raise SystemExit("shmq kafka enable: give HOST:PORT (e.g. 127.0.0.1:9092)")
        d = write_setting(root, args.address, args.advertise)
        print(f"Kafka listener enabled on {d['listen']} (the coordinator starts it).")
    elif args.action == "disable":
        print("Kafka listener disabled." if remove_setting(root) else "No Kafka listener was enabled.")
    else:
        from ..coordinator.client import lock_held
        d = read_setting(root)
        running = lock_held(root.kafka_lock_path)
        print(f"setting: {d['listen'] if d else 'none'}; listener {'running' if running else 'not running'}")
    return 0


def stop(args: argparse.Namespace) -> int:
    from ..coordinator.lifecycle import stop_root
    from ..root import Root, default_root_path
    path = os.path.abspath(args.root) if args.root else default_root_path()
    if not os.path.isdir(path):
        print(f"No shmq root at {path}: nothing to stop.")
        return 0
    stopped, killed = stop_root(Root(path, create=False), timeout=args.timeout)
    if not stopped and not killed:
        print(f"No shmq process runs on {path}.")
        return 0
    for pid, kind in sorted(stopped.items()):
        print(f"Stopped {kind} pid {pid}.")
    for pid, kind in sorted(killed.items()):
        print(f"Killed {kind} pid {pid}: it did not stop within {args.timeout:.0f} s.", file=sys.stderr)
    print(f"Nothing of {path} runs now; its data stays in place.")
    return 1 if killed else 0


def topics(args: argparse.Namespace) -> int:
    from ..admin import Admin
    with Admin(args.root) as admin:
        if args.action == "create":
            config = _config_pairs(args.config)
            if args.replication_factor is not None:
                config["replication_factor"] = args.replication_factor
            admin.create_topic(args.topic, partitions=args.partitions, config=config)
            print(f"Created topic {args.topic}.")
        elif args.action == "list":
            for name in admin.list_topics():
                print(name)
        elif args.action == "delete":
            admin.delete_topic(args.topic)
            print(f"Deleted topic {args.topic}.")
        elif args.action == "alter":
            admin.alter_config(args.topic, _config_pairs(args.config))
            print(f"Altered config of topic {args.topic}.")
        elif args.action == "describe":
            names = [args.topic] if args.topic else admin.list_topics()
            for name in names:
                d = admin.describe_topic(name)
                cfg = ",".join(f"{k}={v}" for k, v in sorted(d.config.items()))
                print(f"Topic: {d.name}\tTopicId: {d.topic_id}\tPartitionCount: {d.partition_count}\tConfigs: {cfg}")
                for p in d.partitions:
                    extra = ""
                    if p.high_watermark is not None:
                        extra = f"\tHighWatermark: {p.high_watermark}\tLeaderEpoch: {p.leader_epoch}"
                        if p.offline:
                            extra += f"\tOffline: {','.join(map(str, p.offline))}"
                        if p.unclean:
                            extra += f"\tUncleanDropped: {p.unclean['dropped']}"
                    print(f"\tTopic: {d.name}\tPartition: {p.partition}\t"
                          f"Leader: {p.leader if p.leader >= 0 else 'none'}\t"
                          f"Replicas: {','.join(map(str, p.replicas))}\tIsr: {','.join(map(str, p.isr))}\t"
                          f"LogStartOffset: {p.start_offset}\tLogEndOffset: {p.end_offset}{extra}")
    return 0


def produce(args: argparse.Namespace) -> int:
    from ..producer import Producer
    sent = 0
    with Producer(args.root, acks=args.acks if args.acks == "all" else int(args.acks)) as producer:
        for line in sys.stdin.buffer:
            line = line.rstrip(b"\r\n")
            key = None
            if args.key_separator:
                sep = args.key_separator.encode()
                if sep not in line:
                    print(f"shmq produce: line {sent + 1} has no key separator {args.key_separator!r}",
                          file=sys.stderr)
                    return 1
                key, line = line.split(sep, 1)
            md = producer.send(args.topic, line, key=key, partition=args.partition)
            sent += 1
            if args.verbose:
                print(f"{md.topic}-{md.partition}@{md.offset}")
    print(f"Sent {sent} records to {args.topic}.", file=sys.stderr)
    return 0


def consume(args: argparse.Namespace) -> int:
    from ..consumer import Consumer
    from ..message import TopicPartition
    reset = "earliest" if args.from_beginning else "latest"
    consumer = Consumer(group_id=args.group, root=args.root, auto_offset_reset=reset,
                        enable_auto_commit=args.group is not None)
    try:
        if args.partition is not None:
            consumer.assign([TopicPartition(args.topic, args.partition)])
            if args.offset is not None:
                consumer.seek(TopicPartition(args.topic, args.partition), args.offset)
        else:
            if args.offset is not None:
                print("shmq consume: --offset needs --partition", file=sys.stderr)
                return 1
            consumer.subscribe([args.topic])
        got = 0
        idle_deadline = time.monotonic() + args.timeout_ms / 1000 if args.timeout_ms else None
        while args.max_messages is None or got < args.max_messages:
            msg = consumer.poll(0.1)
            if msg is None:
                if idle_deadline is not None and time.monotonic() >= idle_deadline:
                    break
                continue
            if args.timeout_ms:
                idle_deadline = time.monotonic() + args.timeout_ms / 1000
            got += 1
            if args.json:
                print(json.dumps({"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                                  "timestamp_ms": msg.timestamp_ms,
                                  "key": None if msg.key is None else msg.key.decode("utf-8", "replace"),
                                  "value": None if msg.value is None else msg.value.decode("utf-8", "replace"),
                                  "headers": [[k, None if v is None else v.decode("utf-8", "replace")]
                                              for k, v in msg.headers]}))
            else:
                parts = []
                if args.print_timestamp:
                    parts.append(f"CreateTime:{msg.timestamp_ms}")
                if args.print_partition:
                    parts.append(f"Partition:{msg.partition}")
                if args.print_offset:
                    parts.append(f"Offset:{msg.offset}")
                if args.print_key:
                    parts.append("null" if msg.key is None else msg.key.decode("utf-8", "replace"))
                parts.append("null" if msg.value is None else msg.value.decode("utf-8", "replace"))
                print("\t".join(parts))
            sys.stdout.flush()
        print(f"Processed a total of {got} messages", file=sys.stderr)
    finally:
        consumer.close()
    return 0


def status(args: argparse.Namespace) -> int:
    import psutil

    from ..admin import Admin
    from ..coordinator.client import CoordinatorClient
    with CoordinatorClient(args.root) as client:
        st = client.status()
        print(f"Coordinator: pid {st.get('pid')} on {client.root.path}, up {st.get('uptime_s', 0):.0f} s")
        clients = st.get("clients") or []
        txns = st.get("transactions") or []
        for rid, rep in sorted((st.get("replicas") or {}).items(), key=lambda kv: int(kv[0])):
            state = f"pid {rep.get('pid')}" if rep.get("registered") else "not running"
            print(f"Replica process {rid}: {state}")
            if rep.get("start_error"):
                print(f"  its last start failed: {rep['start_error']}")
    from ..cluster import Cluster
    cluster = Cluster(args.root)
    try:
        with Admin(args.root) as admin:
            for name in admin.list_topics():
                d = admin.describe_topic(name)
                print(f"Topic {name}: {d.partition_count} partitions")
                for p in d.partitions:
                    print(f"  {name}-{p.partition}: log start {p.start_offset}  log end {p.end_offset}  "
                          f"records {p.end_offset - p.start_offset}")
                    _print_readers(cluster, name, p.partition, p.end_offset)
    finally:
        cluster.close()
    if txns:
        print("Open transactions:")
        for t in txns:
            print(f"  {t['transactional_id']}: producer {t['producer_id']} epoch {t['epoch']} {t['state']}  "
                  f"age {t['age_ms'] / 1000:.1f} s (timeout {t['timeout_ms'] / 1000:.1f} s)  "
                  f"partitions {', '.join(t['partitions']) or '-'}"
                  + (f"  offsets of {', '.join(t['groups'])}" if t["groups"] else ""))
    pids = sorted({int(c["pid"]) for c in clients if isinstance(c, dict) and c.get("pid")})
    if pids:
        print("Client processes:")
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
                    cmd = " ".join(" ".join(proc.cmdline()).split())[:60]
                    print(f"  pid {pid:>7}  {cmd:<60}  cpu {cpu.user + cpu.system:8.2f} s  rss {rss / 1e6:8.1f} MB")
            except psutil.Error:
                print(f"  pid {pid:>7}  (gone)")
    return 0


def _print_readers(cluster: Any, topic: str, partition: int, end: int) -> None:
    """The partition's live readers (reader table) with position and lag, and what
    retention did: producers' waits for room, records overrun readers missed."""
    try:
        plog = cluster.log(topic, partition)
    except Exception as e:                         # no leader right now, files gone: say so, go on
        print(f"    (reader table unavailable: {e})")
        return
    if plog.blocked_count:
        print(f"    producers waited for room {plog.blocked_count} times, {plog.blocked_seconds:.3f} s in all "
              f"({plog.config.overflow} mode)")
    for r in plog.readers():
        label = f" '{r.label}'" if r.label else ""
        missed = f"  missed {r.missed}" if r.missed else ""
        print(f"    {r.kind}{label} pid {r.pid}: position {r.position}  lag {max(0, end - r.position)}"
              f"{'' if r.tethered else '  untethered'}{missed}")


def groups(args: argparse.Namespace) -> int:
    """`shmq groups list|describe|reset-offsets|delete`, as kafka-consumer-groups."""
    from ..admin import Admin
    with Admin(args.root) as admin:
        if args.action == "list":
            for g in admin.list_groups():
                print(g["group"] if not args.state else f"{g['group']}\t{g['state']}\t{g['members']}")
            return 0
        if not args.group:
            print(f"shmq groups {args.action}: needs a group", file=sys.stderr)
            return 1
        if args.action == "describe":
            d = admin.describe_group(args.group)
            if args.members:
                print(f"{'GROUP':<20} {'CONSUMER-ID':<36} {'HOST':<12} {'CLIENT-ID':<20} {'PID':>7} {'#PARTITIONS':>11}")
                for m in d.members:
                    print(f"{d.group:<20} {m.member_id:<36} {m.host:<12} {m.client_id:<20} {m.pid:>7} "
                          f"{len(m.assignment):>11}")
                return 0
            print(f"Consumer group '{d.group}': state {d.state}, {len(d.members)} member(s)"
                  + (f", assignor {d.assignor}, generation {d.generation}" if d.assignor else ""))
            print(f"{'GROUP':<20} {'TOPIC':<20} {'PARTITION':>9} {'CURRENT-OFFSET':>14} {'LOG-END-OFFSET':>14} "
                  f"{'LAG':>8} {'CONSUMER-ID':<36} {'HOST':<12} {'CLIENT-ID':<20} {'PID':>7} {'POSITION':>10} "
                  f"{'POSITION-LAG':>12}")
            for p in d.partitions:
                print(f"{d.group:<20} {p.topic:<20} {p.partition:>9} "
                      f"{'-' if p.committed is None else p.committed:>14} {p.log_end:>14} "
                      f"{'-' if p.lag is None else p.lag:>8} {p.member_id or '-':<36} {p.host or '-':<12} "
                      f"{p.client_id or '-':<20} {p.pid or '-':>7} {'-' if p.position is None else p.position:>10} "
                      f"{'-' if p.position is None else max(0, p.log_end - p.position):>12}")
            return 0
        if args.action == "delete":
            admin.delete_group(args.group)
            print(f"Deleted consumer group '{args.group}'.")
            return 0
        # reset-offsets
        modes = [m for m in ("to_earliest", "to_latest", "to_offset", "to_datetime", "to_timestamp")
                 if getattr(args, m) not in (None, False)]
        if len(modes) != 1:
            print("shmq groups reset-offsets: give exactly one of --to-earliest, --to-latest, --to-offset N, "
                  "--to-timestamp MS, --to-datetime ISO", file=sys.stderr)
            return 1
        mode, value = modes[0], None
        if mode == "to_offset":
            to, value = "offset", args.to_offset
        elif mode == "to_timestamp":
            to, value = "timestamp", args.to_timestamp
        elif mode == "to_datetime":
            from datetime import datetime
            to, value = "timestamp", int(datetime.fromisoformat(args.to_datetime).timestamp() * 1000)
        else:
            to = mode[3:]
        res = admin.reset_offsets(args.group, to, topics=[args.topic] if args.topic else None, value=value,
                                  dry_run=not args.execute)
        print(f"{'GROUP':<20} {'TOPIC':<20} {'PARTITION':>9} {'NEW-OFFSET':>10}")
        for (t, p), off in sorted(res.items()):
            print(f"{args.group:<20} {t:<20} {p:>9} {off:>10}")
        if not args.execute:
            print("(dry run: add --execute to apply)", file=sys.stderr)
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the coordinator in the foreground")
    s.add_argument("--standby", action="store_true", help="wait and take over when the active one dies")
    s.add_argument("--kafka", metavar="HOST:PORT", default=None,
                   help="also run a Kafka protocol listener there (e.g. 127.0.0.1:9092; off unless given)")
    s.add_argument("--kafka-advertise", metavar="HOST", default=None, help="host name the listener gives clients")
    s.add_argument("--idle-exit-ms", type=int, default=0, metavar="MS",
                   help="exit once no client has been connected for this long (default 0: never)")
    s.set_defaults(func=serve)

    sp = sub.add_parser("stop", help="stop the coordinator, standbys and replica processes of the root")
    sp.add_argument("--timeout", type=float, default=15.0, help="seconds each may take to exit before SIGKILL")
    sp.set_defaults(func=stop)

    k = sub.add_parser("kafka", help="the root's Kafka protocol listener, run by the coordinator")
    k.add_argument("action", choices=["enable", "disable", "status"])
    k.add_argument("address", nargs="?", help="HOST:PORT to listen on (enable)")
    k.add_argument("--advertise", default=None, help="host name the listener gives clients")
    k.set_defaults(func=kafka)

    t = sub.add_parser("topics", help="create, list, describe, delete or alter topics")
    t.add_argument("action", choices=["create", "list", "describe", "delete", "alter"])
    t.add_argument("topic", nargs="?")
    t.add_argument("--partitions", type=int, default=1)
    t.add_argument("--replication-factor", type=int, default=None, help="replicas per partition (default 1)")
    t.add_argument("--config", action="append", metavar="KEY=VALUE", help="topic config (repeatable)")
    t.set_defaults(func=topics)

    p = sub.add_parser("produce", help="send lines from stdin as records")
    p.add_argument("topic")
    p.add_argument("--key-separator", default=None, help="split each line into key and value at this string")
    p.add_argument("--partition", type=int, default=None)
    p.add_argument("--acks", default="1", choices=["0", "1", "all"])
    p.add_argument("--verbose", action="store_true", help="print topic-partition@offset per record")
    p.set_defaults(func=produce)

    c = sub.add_parser("consume", help="print records of a topic")
    c.add_argument("topic")
    c.add_argument("--group", default=None)
    c.add_argument("--from-beginning", action="store_true")
    c.add_argument("--partition", type=int, default=None)
    c.add_argument("--offset", type=int, default=None)
    c.add_argument("--max-messages", type=int, default=None)
    c.add_argument("--timeout-ms", type=int, default=0, help="stop after this long without a record")
    c.add_argument("--print-key", action="store_true")
    c.add_argument("--print-offset", action="store_true")
    c.add_argument("--print-partition", action="store_true")
    c.add_argument("--print-timestamp", action="store_true")
    c.add_argument("--json", action="store_true", help="one JSON object per record")
    c.set_defaults(func=consume)

    g = sub.add_parser("groups", help="list, describe, reset offsets of or delete consumer groups")
    g.add_argument("action", choices=["list", "describe", "reset-offsets", "delete"])
    g.add_argument("group", nargs="?")
    g.add_argument("--state", action="store_true", help="list: print state and member count too")
    g.add_argument("--members", action="store_true", help="describe: one line per member")
    g.add_argument("--topic", default=None, help="reset-offsets: only this topic")
    g.add_argument("--to-earliest", action="store_true")
    g.add_argument("--to-latest", action="store_true")
    g.add_argument("--to-offset", type=int, default=None)
    g.add_argument("--to-timestamp", type=int, default=None, metavar="MS")
    g.add_argument("--to-datetime", default=None, metavar="ISO")
    g.add_argument("--execute", action="store_true", help="reset-offsets: apply (default: dry run)")
    g.set_defaults(func=groups)

    st = sub.add_parser("status", help="coordinator, topics, partitions and client processes")
    st.set_defaults(func=status)

