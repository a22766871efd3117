"""Kafka's wire protocol for a shmq root: unmodified Kafka clients (librdkafka,
kafka-python, aiokafka, kcat, ...) produce to and consume from shmq topics.

``KafkaListener`` (``server.py``) is the TCP server; one module per API
family (``api_admin``, ``api_data``, ``api_groups``), group membership
proxied into the coordinator (``groups``), SASL/PLAIN (``sasl``), message
formats through kio (``codec``). Run it with ``shmq serve --kafka HOST:PORT``
or ``python -m shmq.kafka --listen HOST:PORT``.
"""
from __future__ import annotations

__all__ = ["KafkaListener", "DEFAULT_PORT"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Lazy: importing shmq.kafka must not need kio until a listener is made.
    if name in __all__:
        from . import server
        return getattr(server, name)
    raise AttributeError(name)
