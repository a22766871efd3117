"""The coordinator: metadata store, RPC server, housekeeping and the client side.

Public pieces (for Producer, Consumer, Admin and the CLI):

* ``CoordinatorClient(root)``: RPCs (topics, ``commit_offsets`` / ``fetch_offsets``,
  ``allocate_producer_id``, ``status``) and ``metadata()``.
* ``MetadataView`` / ``TopicMetadata``: the hot-path shared metadata mapping.
* ``Coordinator``: the server (``python -m shmq.coordinator``).
* ``housekeep_once`` / ``LogRegistry`` / ``Housekeeper``: partition housekeeping.
"""
from .client import CoordinatorClient, coordinator_alive
from .housekeeping import Housekeeper, LogRegistry, housekeep_once
from .metamap import MetadataView, TopicMetadata
from .server import Coordinator

__all__ = ["CoordinatorClient", "coordinator_alive", "Coordinator", "MetadataView", "TopicMetadata",
           "Housekeeper", "LogRegistry", "housekeep_once"]
