"""fedlora's extension protocol: how a method shapes a run without the round protocol naming it.

A method (a privacy mechanism, a continual method, a client-side term a strategy asks for) is an
:class:`Extension` subclass, registered with :func:`fedlora.registry.register_extension` and chosen
for a run by its own :meth:`Extension.applies` on the run's config, as PEFT picks a LoRA variant
from ``LoraConfig``. The hub files (``strategies/base.py``, ``clients/app.py``) call the hooks
below in a fixed order (``order``, then name) and never ask which method is on.

Server side (one instance per run, built with the strategy):

* :meth:`Extension.round_config`: keys added to every train message's config this round (Flower's
  FedProx sends ``proximal-mu`` this way);
* :meth:`Extension.server_state` / :meth:`Extension.load_server_state`: what the checkpoint keeps.

Client side (one instance per message; everything a hook reads is on :class:`ClientRound`):

* :meth:`Extension.training`: a context around the local training that yields the
  :class:`~fedlora.training.TrainingHook` objects it adds to the one loop; the code after its
  ``yield`` runs only when training succeeded (keep local state there);
* :meth:`Extension.evaluating`: a context around a client's evaluation;
* :meth:`Extension.reply_factors`: the factors the reply carries, from those the client would send;
* :meth:`Extension.reply_metrics`: scalars added to the reply's metrics.

Config: a plug-in may own a config section (``section``: a dataclass of typed, documented keys
with a ``validate()``; ``[<section_name>]`` in the run's TOML) and refuses what it cannot run with in
:meth:`Extension.check_with_run`. This module imports neither torch nor Flower: the config reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

    from fedlora.config import FedLoraConfig
    from fedlora.factors import LoraFactors
    from fedlora.partitions import ClientData
    from fedlora.sharing import SharingPolicy
    from fedlora.state import ClientStateStore
    from fedlora.training import TrainingHook


@dataclass
class ClientRound:
    """One train or evaluate message as a client-side hook sees it, after the received parts are
    loaded into ``model``."""

    cfg: FedLoraConfig
    server_round: int
    config: dict[str, Any]  # the message's config record: the round protocol's keys and every round_config
    arrays: ArrayRecord  # the message's arrays as received (extensions may carry their own namespaces)
    received: LoraFactors  # the shared parts the server sent, decoded (client form)
    model: torch.nn.Module
    policy: SharingPolicy
    client_id: str
    partition_id: int
    store: ClientStateStore  # this client's state across rounds and restarts
    device: torch.device
    data: ClientData  # this round's data (in a task sequence: the round's task)
    modules: list[str]  # the run's adapted module names, in wire order


class Extension:
    """A method that shapes a run; every hook is optional (the defaults change nothing)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50  # hooks run by ascending order: the built-in concerns first
    section_name: ClassVar[str] = ""  # its own config section [section_name] ('' = none)
    section: ClassVar[type | None] = None  # the section's dataclass (typed keys with help, validate())
    continual_method: ClassVar[str] = ""  # a continual method it provides: continual.method = this

    def __init__(self, cfg: FedLoraConfig) -> None:
        self.cfg = cfg

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        """Whether the run ``cfg`` uses this extension."""
        return False

    @classmethod
    def check_with_run(cls, cfg: FedLoraConfig, policy: SharingPolicy) -> None:
        """Raise :class:`~fedlora.schema.ConfigError` with a sentence for what it cannot run with
        (called on load, only when it applies)."""

    # ------------------------------------------------------------------ server side
    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        """Keys to add to every train message's config in ``server_round``."""
        return {}

    def server_state(self) -> dict:
        """JSON-able state for the server's checkpoint."""
        return {}

    def load_server_state(self, state: dict) -> None:
        """Restore :meth:`server_state`'s output from a checkpoint."""

    # ------------------------------------------------------------------ client side
    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list[TrainingHook]]:
        """Around the local training: yields the hooks added to the training loop."""
        yield []

    @contextmanager
    def evaluating(self, client: ClientRound) -> Iterator[None]:
        """Around a client's evaluation of its model."""
        yield None

    def reply_factors(self, client: ClientRound, factors: LoraFactors) -> LoraFactors:
        """The factors the reply carries, given what the client would send."""
        return factors

    def reply_metrics(self, client: ClientRound) -> dict[str, float]:
        """Scalars added to a train or evaluate reply's metrics."""
        return {}
