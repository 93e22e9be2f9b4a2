"""One client's view of a run: config, identity, rank, data, model, private state.

Used by the ClientApp handlers; every step is driven by the run's sharing policy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedlora import codec
from fedlora.cache import BoundedCache
from fedlora.config import ConfigError, FedLoraConfig, digest_of
from fedlora.data import load_task
from fedlora.extensions import ClientRound, Extension, first_answer
from fedlora.factors import LoraFactors, extract_factors, load_factors
from fedlora.model import (
    AdapterSpec,
    build_peft_model,
    check_device,
    initial_factors,
    place,
    save_adapter,
    set_trainable,
)
from fedlora.partitions import ClientData, client_data, local_client_data
from fedlora.protocol import NodeProfile, partition_client_id
from fedlora.registry import extensions_for, policy_for
from fedlora.sharing import SharingPolicy
from fedlora.state import OWN_RANK, ClientStateStore, atomic_write_bytes
from fedlora.training import pick_device

log = logging.getLogger("fedlora.client")

STATE_KEY = "fedlora"
SETUP_FILE = "run-setup.json"  # deployment: this node's setup of the current run, in its state folder
_CONFIGS: BoundedCache[FedLoraConfig] = BoundedCache(8)


class SetupMissing(RuntimeError):
    """A train/evaluate message reached a node that never received the run config."""


def is_local_path(name: str) -> bool:
    """A model name that is a folder on this machine (not a builtin or a hub id)."""
    if name.startswith("builtin:"):
        return False
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def device_view(cfg: FedLoraConfig, node_config: dict) -> FedLoraConfig:
    """The run config as a deployed device applies it: what touches the device's file system is its
    owner's to decide, never the server's. The model cache is the device's own (``cache-dir``, else
    FEDLORA_CACHE or ~/.cache/fedlora); a base model named by a local path loads only from a folder the
    owner allowed (``model-dirs``); personal adapters go inside ``state-dir`` (see
    :meth:`ClientSession.save_personal_adapter`); the run's data.dataset is never read for a device
    with its own data (global-view evaluation is skipped there)."""
    from dataclasses import replace

    model = replace(cfg.model, cache_dir=str(node_config.get("cache-dir", "") or ""))
    if is_local_path(cfg.model.name):
        wanted = Path(cfg.model.name).expanduser().resolve()
        allowed = [
            Path(d).expanduser().resolve() for d in str(node_config.get("model-dirs", "")).split(os.pathsep) if d
        ]
        if not any(wanted.is_relative_to(d) for d in allowed):
            raise ConfigError(
                f"the run asks this device to load its base model from {wanted}, a folder on this "
                f"device that its owner has not allowed: start fedlora client with --model-dir "
                f"{wanted.parent} to allow it (now: {', '.join(map(str, allowed)) or 'none'})"
            )
    return replace(cfg, model=model)


@dataclass
class ClientSession:
    cfg: FedLoraConfig
    policy: SharingPolicy
    profile: NodeProfile
    data: ClientData
    store: ClientStateStore
    device: torch.device
    modules: list[str] | None = None  # the run's module list (wire keys are indices into it)

    # --------------------------------------------------------------------- construction
    label_names: list[str] | None = None  # the run's label space, as the server sent it
    device_dir: str = ""  # a deployed device's own state folder (its owner's): every file it writes goes there
    _extensions: list[Extension] | None = None

    @staticmethod
    def remember_config(context: Context, run_config_json: str, label_names: list[str] | None = None) -> FedLoraConfig:
        cfg = FedLoraConfig.from_json(run_config_json)
        # The digest of the text the server sent (what the server's own digest is), not of this
        # client's re-serialisation: a client whose fedlora knows more config keys still agrees.
        digest = digest_of(run_config_json)
        record = {"run-config": run_config_json, "digest": digest}
        if label_names is not None:
            record["label-names"] = json.dumps(list(label_names))
        context.state.config_records[STATE_KEY] = ConfigRecord(record)
        _CONFIGS[digest] = cfg
        return cfg

    @staticmethod
    def persist_setup(context: Context) -> None:
        """Deployment: keep this run's setup in the node's state folder, so a SuperNode restarted mid-run
        (Flower keeps a node's run state in memory only) carries on, and `fedlora client`'s resident
        executor can build the run's model before the next task arrives."""
        root = str(context.node_config.get("state-dir", ""))
        if not root:
            return

        setup = {
            **dict(context.state.config_records[STATE_KEY]),
            "node-config": dict(context.node_config),
            "node-id": int(context.node_id),
        }
        atomic_write_bytes(Path(root) / SETUP_FILE, json.dumps(setup, sort_keys=True).encode())

    @classmethod
    def from_context(cls, context: Context, digest: str | None = None) -> ClientSession:
        rec = context.state.config_records.get(STATE_KEY)
        if rec is None and digest and str(context.node_config.get("state-dir", "")):
            kept = Path(str(context.node_config["state-dir"])) / SETUP_FILE
            saved = json.loads(kept.read_text()) if kept.exists() else {}
            if saved.get("digest") == digest:  # the same run's setup, from before this node restarted
                rec = ConfigRecord({k: saved[k] for k in ("run-config", "digest", "label-names") if k in saved})
                context.state.config_records[STATE_KEY] = rec
        if rec is None:
            raise SetupMissing("this node has not received the run configuration (setup message missing)")
        if digest and rec["digest"] != digest:
            raise SetupMissing(f"run config digest {digest} differs from this node's {rec['digest']}")
        cfg = _CONFIGS.get(str(rec["digest"])) or FedLoraConfig.from_json(str(rec["run-config"]))
        _CONFIGS[str(rec["digest"])] = cfg
        names = json.loads(str(rec["label-names"])) if "label-names" in rec else None
        return cls.from_parts(cfg, dict(context.node_config), int(context.node_id), names)

    @classmethod
    def from_parts(
        cls, cfg: FedLoraConfig, node_config: dict, node_id: int, label_names: list[str] | None = None
    ) -> ClientSession:
        """A session from the run config and this node's config (Flower's ``node_config``).

        ``data``: the device's own data (deployment); otherwise the client reads partition
        ``partition-id`` of the run's dataset (simulation, `flwr run` local simulation)."""
        nc = node_config
        if str(nc.get("state-dir", "")):
            cfg = device_view(cfg, nc)
        partition = int(nc.get("partition-id", 0))
        parts = int(nc.get("num-partitions", 0) or 0)
        if parts and parts != cfg.federation.num_clients and not str(nc.get("data", "")):
            # `flwr run` simulation: Flower numbers its virtual nodes; the run's config splits its data.
            log.warning(
                "Flower runs %d nodes but the run config splits its data into federation.num_clients=%d "
                "partitions: node %d trains on partition %d of %d (set num_clients to the node count to "
                "use all the data)",
                parts,
                cfg.federation.num_clients,
                partition,
                partition,
                cfg.federation.num_clients,
            )
        client_id = str(nc.get("client-id", "") or partition_client_id(partition))
        store_root = (
            str(nc.get("state-dir", "")) or cfg.simulation.state_dir or str(Path.home() / ".fedlora" / "client_state")
        )
        store = ClientStateStore(store_root)
        rank = int(nc.get("rank", 0)) or cfg.client_rank(partition)
        rank = int(store.load(client_id, OWN_RANK, rank))  # an extension may have lowered it (HetLoRA's pruning)
        device_class = str(nc.get("device-class", "")) or cfg.client_class(partition)
        threads = int(nc.get("threads", 0) or 0) or cfg.train.num_threads  # the device's own setting wins
        if threads:
            torch.set_num_threads(threads)
        extensions = extensions_for(cfg)
        decided = first_answer(extensions, lambda e: e.client_data(partition, str(nc.get("data", ""))))
        if decided is not None:  # an extension's data (a task sequence: the first task's, the sizes of the largest)
            data, sizes = decided[0], (decided[1], decided[2])
        elif str(nc.get("data", "")):
            if label_names is None:
                raise SetupMissing("a client with its own data needs the run's label names from the server's setup")
            try:
                data = local_client_data(cfg, str(nc["data"]), label_names)
            except ConfigError as exc:  # the device's own files: said on its console, naming its flag
                log.error("--data %s: %s", nc["data"], exc)
                raise ConfigError(f"--data {nc['data']}: {exc}") from None
            sizes = (len(data.train), len(data.test))
        else:
            data = client_data(cfg, partition)
            sizes = (len(data.train), len(data.test))
        profile = NodeProfile(
            node_id=node_id,
            client_id=client_id,
            partition_id=partition,
            rank=rank,
            alpha=cfg.lora.alpha_for_rank(rank),
            num_train=sizes[0],
            num_test=sizes[1],
            device_class=device_class,
        )
        device = pick_device(cfg.train.device)
        check_device(cfg, device)  # a quantized or float16 base on a CPU: refused before any training
        return cls(
            cfg=cfg,
            policy=policy_for(cfg.federation.strategy),
            profile=profile,
            data=data,
            store=store,
            device=device,
            label_names=label_names,
            device_dir=str(nc.get("state-dir", "")),
            _extensions=extensions,
        )

    def labels(self) -> list[str]:
        """The run's label space: as the server sent it, else as an extension decides it, else the dataset's."""
        if self.label_names is not None:
            return list(self.label_names)
        decided = first_answer(self.extensions, lambda e: e.label_names())
        return decided if decided is not None else load_task(self.cfg).label_names

    def use_round(self, server_round: int) -> None:
        """This round's data, when an extension changes it (a task sequence: the round's task's split)."""
        data = first_answer(self.extensions, lambda e: e.round_data(self.profile.partition_id, server_round))
        if data is not None:
            self.data = data

    # --------------------------------------------------------------------- model
    def model(self) -> torch.nn.Module:
        spec = AdapterSpec.for_rank(self.cfg, self.profile.rank, self.profile.alpha)
        labels = self.labels()
        return place(build_peft_model(self.cfg, len(labels), spec, labels), self.device)

    def prepare(self, model: torch.nn.Module, received: ArrayRecord, server_round: int) -> LoraFactors:
        """Set every trainable tensor for this message: seed init, private state, received parts.

        Returns the decoded received factors (for validation and accounting).
        """
        policy = self.policy
        seed = self.cfg.lora.init_seed
        for e in self.extensions:  # FLoRA: the round's; a task sequence: each task's new LoRA's
            seed = e.adapter_seed(server_round, seed)
        start = initial_factors(model, seed)
        for e in self.extensions:  # parts the client keeps itself (FedSA-LoRA's B)
            start = e.own_parts(self.profile.client_id, self.store, start)
        self.modules = list(start.modules)
        incoming = codec.decode(received, alpha=self.profile.alpha, modules=self.modules)
        unexpected = incoming.parts() - policy.shared
        if unexpected:
            raise codec.CodecError(
                f"server sent parts {sorted(unexpected)} that the {self.cfg.federation.strategy} "
                f"policy ({policy.describe()}) does not share"
            )
        load_factors(model, start.merged_with(incoming))
        for e in self.extensions:  # FLoRA: the global delta merged into the base weights
            e.after_load(model, received, self.modules)
        set_trainable(model, policy.trained)
        return incoming

    # --------------------------------------------------------------------- extensions
    @property
    def extensions(self) -> list[Extension]:
        """The run's extensions (:mod:`fedlora.extensions`), in hook order; built once per session."""
        if self._extensions is None:
            self._extensions = extensions_for(self.cfg)
        return self._extensions

    def client_round(
        self, model: torch.nn.Module, arrays: ArrayRecord, received: LoraFactors, server_round: int, config: dict
    ) -> ClientRound:
        """What this message's extension hooks see (after :meth:`prepare` loaded ``received``)."""
        return ClientRound(
            cfg=self.cfg,
            server_round=server_round,
            config=config,
            arrays=arrays,
            received=received,
            model=model,
            policy=self.policy,
            client_id=self.profile.client_id,
            partition_id=self.profile.partition_id,
            store=self.store,
            device=self.device,
            data=self.data,
            modules=list(self.modules or []),
        )

    def finish_training(self, model: torch.nn.Module) -> LoraFactors:
        """Let the extensions keep what stays on the client; return the shared factors (which their
        :meth:`~fedlora.extensions.Extension.reply_factors` may still reduce: HetLoRA's rank pruning)."""
        out = extract_factors(model)
        for e in self.extensions:  # what stays on the client (FedSA-LoRA's B)
            e.keep_own(self.profile.client_id, self.store, out)
        return out.select(self.policy.shared)

    def save_personal_adapter(self, model: torch.nn.Module) -> str:
        # A device writes inside the state folder its owner gave (--state-dir), never where the run config
        # points; a simulation keeps its clients' adapters beside their state, in the run directory.
        if self.device_dir:
            root = Path(self.device_dir) / "adapters" / self.profile.client_id
        else:
            root = Path(self.cfg.simulation.state_dir or self.store.root).parent / "adapters" / self.profile.client_id
        save_adapter(model, root, self.cfg.model.name, self.labels())
        return str(root)
