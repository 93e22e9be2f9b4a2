"""What travels between fedlora's server and clients, and the node profile.

Message content keys (constructor arguments of the strategies, defaults here):

* ``arrays``: an ``ArrayRecord`` of factors in the receiving/sending client's own form
  (``<module>/A``, ``<module>/B``, ``head/<name>``); FLoRA's global delta travels in the same
  record under the ``base/`` prefix.
* ``config``: a ``ConfigRecord`` with ``server-round`` and ``config-digest`` (train/evaluate), or
  ``action="setup"`` and ``run-config`` (the whole run config as JSON, sent once per node).
* ``metrics``: the reply's ``MetricRecord`` (``num-examples`` weights the aggregation).
* ``profile``: the setup reply's ``ConfigRecord`` (see :class:`NodeProfile`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PROFILE = "profile"
BASE_PREFIX = "base/"
SETUP = "setup"


@dataclass
class NodeProfile:
    """What a client tells the server once, at setup."""

    node_id: int
    client_id: str
    partition_id: int
    rank: int
    alpha: float
    num_train: int
    num_test: int
    device_class: str = ""

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict) -> NodeProfile:
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__})  # type: ignore[attr-defined]


class NodeNames(Protocol):
    """The client id the runtime binds to a node (None: none bound), whatever id the node declares:
    a deployment's enrolled keys (:class:`fedlora.deploy.control.EnrolledNodes`), a simulation's
    partitions (:class:`fedlora.simulate.PartitionNames`)."""

    binding: str  # how the id is bound, as a log line says it: "<binding> '<client id>'"

    def __call__(self, node: int) -> str | None: ...


def partition_client_id(partition: int) -> str:
    """The client id of a node that is given only its partition (a simulation's virtual clients)."""
    return f"client-{partition:05d}"
