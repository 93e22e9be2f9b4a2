"""fedlora's extension protocol: how a method shapes a run without the round protocol naming it.

A method (a privacy mechanism, a continual method, a client-side term a strategy asks for) is an
:class:`Extension` subclass, registered with :func:`fedlora.registry.register_extension` and chosen
for a run by its own :meth:`Extension.applies` on the run's config, as PEFT picks a LoRA variant
from ``LoraConfig``. The hub files (``strategies/base.py``, ``clients/app.py``) call the hooks
below in a fixed order (``order``, then name) and never ask which method is on.

Server side (one instance per run, built with the strategy; what a hook may read or replace of
the run's global adapter is :class:`GlobalAdapter`):

* :meth:`Extension.start_run`: the server starts the run (checks that need the whole run);
* :meth:`Extension.attach`: the run's strategy is built (checks that need its global adapter's size);
* :meth:`Extension.begin_round`: before a train round samples its nodes;
* :meth:`Extension.round_config`: keys added to every train message's config this round (Flower's
  FedProx sends ``proximal-mu`` this way);
* :meth:`Extension.payload_key` / :meth:`Extension.add_payload`: arrays of its own in the message to
  one node (the key says which nodes may share one encoded message);
* :meth:`Extension.reply_accepted`: an accepted train or evaluate reply's metrics;
* :meth:`Extension.round_figures`: figures of the round from its accepted replies (DP-SGD's largest
  epsilon);
* :meth:`Extension.after_fold`: the new global adapter after the strategy's fold (DyLoRA keeps the
  components the round's block did not cover);
* :meth:`Extension.bound_reply`: one checked, decoded reply's update and weight, bounded on their own
  (the robust layer's absolute norm bound and weight cap), or the reply refused;
* :meth:`Extension.reply_stage`: a stage every accepted reply passes through before the fold, in
  arrival order (:class:`ReplyStage`: the robust layer's relative norm bound);
* :meth:`Extension.aggregation`: the round's fold in place of the single-rank weighted mean (the
  robust layer's coordinate median and trimmed mean);
* :meth:`Extension.wrap_fold`: the strategy's fold, wrapped (the robust layer's share cap);
* :meth:`Extension.round_release`: the round's fold replaced by the extension's own release (a
  :class:`RoundRelease`: client-level DP's clipped, noised mean), which also turns off the robust
  layer's data-dependent bound (``releases_round``);
* :meth:`Extension.server_state` / :meth:`Extension.server_tensors` and their ``load_`` pair: what
  the checkpoint keeps;
* :meth:`Extension.label_names` / :meth:`Extension.server_test_set`: the run's label space and the
  server's held-out set when the extension decides them (a task sequence's union and current task);
* :meth:`Extension.client_start`: the adapter a client starts from, as the server reconstructs it;
* :meth:`Extension.server_evaluation`: a context around the server's evaluation of the global
  model, yielding extra metrics to compute on it; :meth:`Extension.evaluates_after` adds rounds
  the server evaluates after;
* :meth:`Extension.export`: what the run's final adapter holds (and files beside it);
* :meth:`Extension.finish_run`: additions to the run's summary once the last round is recorded.

Client side (one instance per message; everything a hook reads is on :class:`ClientRound`):

* :meth:`Extension.client_data` / :meth:`Extension.round_data`: the client's data when the
  extension decides it (a task sequence: the tasks' splits of its partition), and this round's;
* :meth:`Extension.adapter_seed`: the seed of the adapter a client builds for a round;
* :meth:`Extension.own_parts`: the adapter the client starts from, before the received parts go over
  it (FedSA-LoRA's private B from the client's store); :meth:`Extension.after_load`: the model once
  they are loaded (FLoRA merges the global delta into the base weights);
* :meth:`Extension.training`: a context around the local training that yields the
  :class:`~fedlora.training.TrainingHook` objects it adds to the one loop; the code after its
  ``yield`` runs only when training succeeded (keep local state there);
* :meth:`Extension.evaluating`: a context around a client's evaluation;
* :meth:`Extension.keep_own`: everything the client trained, after a successful training (what
  stays on the client is kept here);
* :meth:`Extension.reply_factors`: the factors the reply carries, from those the client would send;
* :meth:`Extension.reply_metrics`: scalars added to the reply's metrics.

Config: a plug-in may own a config section (``section``: a dataclass of typed, documented keys
with a ``validate()``; ``[<section_name>]`` in the run's TOML) and refuses what it cannot run with in
:meth:`Extension.check_with_run`. This module imports neither torch nor Flower: the config reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

    from fedlora.aggregation.folds import Fold
    from fedlora.aggregation.update import Update
    from fedlora.config import FedLoraConfig
    from fedlora.data import Examples
    from fedlora.factors import LoraFactors
    from fedlora.partitions import ClientData
    from fedlora.protocol import NodeProfile
    from fedlora.sharing import SharingPolicy
    from fedlora.state import ClientStateStore
    from fedlora.strategies.round_log import RoundLog
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


class GlobalAdapter(Protocol):
    """The run's global adapter as a server-side hook sees it (the strategy provides it)."""

    cfg: FedLoraConfig
    template: LoraFactors  # client-form shapes at the reference rank, head included
    module_names: list[str]  # the wire's module order
    max_rank: int  # the rank the global adapter is kept at
    global_eff: LoraFactors  # the global adapter, effective form (a hook may replace it)
    sharing_policy: SharingPolicy  # what travels, stays on the clients, or is frozen
    profiles: dict[int, NodeProfile]  # the set-up nodes' checked profiles, by node id

    def initial_global(self, init_eff: LoraFactors) -> LoraFactors:
        """The strategy's global adapter for a freshly built initial adapter (effective form)."""

    def round_start(self, prof: NodeProfile, server_round: int) -> LoraFactors:
        """What a client of profile ``prof`` started this round from (client form): what its update
        is measured from."""


def first_answer(extensions: list[Extension], ask: Callable[[Extension], Any]) -> Any:
    """The first extension's answer (in hook order) that is not None, else None: for the hooks where
    one extension decides and None means "not mine" (label space, data, held-out set)."""
    return next((answer for e in extensions if (answer := ask(e)) is not None), None)


class ReplyStage(Protocol):
    """What one round's accepted replies pass through, in arrival order, before the fold."""

    def offer(self, update: Update) -> list[Update]:
        """The updates ready to fold now, given one more (none while it holds them back)."""

    def flush(self) -> list[Update]:
        """The updates still held when the round's replies end."""

    def end(self) -> None:
        """The round's replies are all in: keep what the next round needs."""


class RoundRelease(Protocol):
    """A round's aggregation owned by an extension: every accepted update with the start it is
    measured from, then the new global adapter and the figures of the release."""

    def add(self, start: LoraFactors, update: LoraFactors) -> None:
        """Fold one accepted update (client form); raise ValueError to reject it untouched."""

    def finish(self, global_eff: LoraFactors) -> tuple[LoraFactors, dict[str, Any]]:
        """(the new global adapter, the round's figures for its metrics row)."""


class Extension:
    """A method that shapes a run; every hook is optional (the defaults change nothing)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50  # hooks run by ascending order: the built-in concerns first
    section_name: ClassVar[str] = ""  # its own config section [section_name] ('' = none)
    section: ClassVar[type | None] = None  # the section's dataclass (typed keys with help, validate())
    continual_method: ClassVar[str] = ""  # a continual method it provides: continual.method = this
    releases_round: ClassVar[bool] = False  # its round_release replaces the strategy's fold

    def __init__(self, cfg: FedLoraConfig) -> None:
        self.cfg = cfg

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        """Whether the run ``cfg`` uses this extension; by default, a continual method's when the run
        names it (``continual.method``), and no other's."""
        return bool(cls.continual_method) and cfg.continual.method == cls.continual_method

    @classmethod
    def check_with_run(cls, cfg: FedLoraConfig, policy: SharingPolicy) -> None:
        """Raise :class:`~fedlora.schema.ConfigError` with a sentence for what it cannot run with
        (called on load, only when it applies)."""

    # ------------------------------------------------------------------ server side
    def start_run(self) -> None:
        """The server starts the run: raise :class:`~fedlora.schema.ConfigError` for what the whole
        run cannot do (a privacy target its rounds and sampling cannot meet)."""

    def attach(self, run: GlobalAdapter) -> None:
        """The run's strategy was built around ``run``: raise :class:`~fedlora.schema.ConfigError` for
        what its global adapter's size rules out (a memory budget)."""

    def begin_round(self, run: GlobalAdapter, rl: RoundLog) -> None:
        """Before train round ``rl.server_round`` samples its nodes: may replace ``run.global_eff`` and
        set the round's state in ``rl`` (its explicit state object: DyLoRA's rank is ``rl.dylora_rank``)."""

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        """Keys to add to every train message's config in ``server_round``."""
        return {}

    def payload_key(self, node_id: int) -> Hashable:
        """What of node ``node_id`` decides :meth:`add_payload` (nodes with equal keys share a message)."""
        return None

    def add_payload(self, run: GlobalAdapter, record: ArrayRecord, node_id: int) -> None:
        """Add this extension's arrays (in its own key namespace) to the message for ``node_id``."""

    def reply_accepted(self, node_id: int, metrics: dict[str, Any]) -> None:
        """A reply of ``node_id`` was accepted; ``metrics`` is its (validated) metric record."""

    def bound_reply(
        self,
        run: GlobalAdapter,
        prof: NodeProfile,
        factors: LoraFactors,
        weight: float,
        server_round: int,
        rl: RoundLog,
    ) -> tuple[LoraFactors, float]:
        """A checked, finite reply of ``prof`` in ``server_round``: its factors (client form) and
        aggregation weight as the fold may take them; raise :class:`~fedlora.validation.RejectedReply`
        to refuse it. Name in ``rl`` whatever it cut."""
        return factors, weight

    def reply_stage(self, run: GlobalAdapter, rl: RoundLog) -> ReplyStage | None:
        """A stage this round's accepted replies pass through before the fold (None: none)."""
        return None

    def aggregation(self) -> Fold | None:
        """A fold of this round's updates in place of the single-rank strategies' weighted mean, or
        None (the strategy's). Strategies with a fold of their own (heterogeneous ranks) never ask."""
        return None

    def wrap_fold(self, fold: Fold, rl: RoundLog) -> Fold:
        """The strategy's fold for this round, wrapped (not called when an extension releases the round)."""
        return fold

    def round_release(self, server_round: int, sampled: int, rank: int) -> RoundRelease | None:
        """This round's aggregation when the extension owns it (``releases_round``), else None.
        ``sampled``: nodes asked to train; ``rank``: the rank released this round."""
        return None

    def round_figures(self, accepted: list[dict[str, Any]]) -> dict[str, Any]:
        """Figures of a finished train round for its metrics row, from the accepted replies' metrics."""
        return {}

    def after_fold(self, run: GlobalAdapter, rl: RoundLog, previous: LoraFactors) -> LoraFactors:
        """The new global adapter after the strategy's own fold (``run.global_eff``; not after an
        extension's release), given the one before the round."""
        return run.global_eff

    def server_state(self) -> dict:
        """JSON-able state for the server's checkpoint."""
        return {}

    def load_server_state(self, state: dict) -> None:
        """Restore :meth:`server_state`'s output from a checkpoint."""

    def server_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the server's checkpoint, each key in this extension's own namespace."""
        return {}

    def load_server_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take this extension's tensors out of a checkpoint's; return the others. Called after
        :meth:`load_server_state`."""
        return tensors

    def label_names(self) -> list[str] | None:
        """The run's label space, when this extension decides it (None: the dataset's)."""
        return None

    def server_test_set(self, server_round: int) -> Examples | None:
        """The server's held-out set after ``server_round``, when this extension decides it (None:
        the dataset's test split, and the clients' validation parts beside it)."""
        return None

    def client_start(self, start: LoraFactors) -> LoraFactors:
        """The adapter (client form) the clients start from this round, given the seed-built one."""
        return start

    @contextmanager
    def server_evaluation(
        self, model: torch.nn.Module, server_round: int, test: Examples, device: torch.device
    ) -> Iterator[Callable[[], dict[str, Any]]]:
        """Around the server's evaluation of the global ``model`` (on ``device``, held-out set
        ``test``) after ``server_round``: yields a function computing this extension's entries of the
        round's metrics row."""
        yield dict

    def evaluates_after(self, server_round: int) -> bool:
        """Whether the server must evaluate after ``server_round`` besides its own schedule."""
        return False

    def export(self, run: GlobalAdapter, factors: LoraFactors, folder: Path) -> LoraFactors:
        """The final adapter to write in PEFT's format (client form, with its alphas), given what the
        strategy exports; files of its own may go into ``folder``."""
        return factors

    def finish_run(self, rows: list[dict], folder: Path) -> dict[str, Any]:
        """Entries for the run's summary from every round's metrics row (plots may go into ``folder``);
        a table the summary already has (``privacy``) is extended, not replaced."""
        return {}

    # ------------------------------------------------------------------ client side
    def client_data(self, partition: int, own_data: str) -> tuple[ClientData, int, int] | None:
        """The client's data when this extension decides it, and the train and test sizes its
        profile declares (the most any round uses); ``own_data``: a device's own data folder ('' in
        a simulation). None: the run's dataset, or the device's own."""
        return None

    def round_data(self, partition: int, server_round: int) -> ClientData | None:
        """The client's data in ``server_round`` when this extension changes it by round."""
        return None

    def adapter_seed(self, server_round: int, seed: int) -> int:
        """The seed of the adapter a client builds for ``server_round``, given the core's."""
        return seed

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list[TrainingHook]]:
        """Around the local training: yields the hooks added to the training loop."""
        yield []

    @contextmanager
    def evaluating(self, client: ClientRound) -> Iterator[None]:
        """Around a client's evaluation of its model."""
        yield None

    def own_parts(self, client_id: str, store: ClientStateStore, start: LoraFactors) -> LoraFactors:
        """The adapter a client starts this message from, before the received parts are loaded over it."""
        return start

    def after_load(self, model: torch.nn.Module, arrays: ArrayRecord, modules: list[str]) -> None:
        """The start and the received parts are in ``model``; ``arrays``: the message's arrays."""

    def keep_own(self, client_id: str, store: ClientStateStore, trained: LoraFactors) -> None:
        """Local training succeeded; ``trained``: every part the client trained (head included)."""

    def reply_factors(self, client: ClientRound, factors: LoraFactors) -> LoraFactors:
        """The factors the reply carries, given what the client would send."""
        return factors

    def reply_metrics(self, client: ClientRound) -> dict[str, float]:
        """Scalars added to a train or evaluate reply's metrics."""
        return {}
