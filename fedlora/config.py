"""One typed, validated configuration for a fedlora run.

A run is described by a TOML file of the sections of :class:`FedLoraConfig` (``[run]``,
``[model]``, ``[lora]``, ``[data]``, ``[federation]``, ``[train]``, ``[hetero]``, ``[robust]``,
``[privacy]``, ``[dylora]``, ``[simulation]``, ``[server]``, ``[continual]``) and of the plug-in
methods (``[fedprox]``, ...: :func:`fedlora.registry.plugin_sections`). Every field has a
default, so an empty file is a valid run (the embedded default). Unknown sections or keys and
impossible values fail on load, before any work starts, with a sentence naming the field.

The server is the source of truth for a run's configuration: it ships the whole config to each
client once (see :mod:`fedlora.protocol`), so clients read nothing of their own beyond their
node config (partition, client id, rank or device class, state directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from fedlora.aggregation.config import HeteroConfig, RobustConfig
from fedlora.continual.config import CONTINUAL_METHODS, ContinualSection, ContinualTask  # noqa: F401 - re-exported
from fedlora.continual.config import check_with_run as check_continual_with_run
from fedlora.deploy.config import ServerSection
from fedlora.privacy.config import PrivacySection
from fedlora.privacy.config import check_with_run as check_privacy_with_run
from fedlora.registry import plugin_extensions, plugin_sections, policy_for
from fedlora.schema import ConfigError, _coerce, _require, _require_template, toml_value  # noqa: F401 - re-exported
from fedlora.sections import (  # noqa: F401 - re-exported
    DTYPES,
    PROMPT_FORMATS,
    TASKS,
    DataConfig,
    DyLoraSection,
    FederationConfig,
    LoraSection,
    ModelConfig,
    RunConfig,
    SimulationConfig,
    TrainConfig,
)


@dataclass
class FedLoraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hetero: HeteroConfig = field(default_factory=HeteroConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    dylora: DyLoraSection = field(default_factory=DyLoraSection)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    server: ServerSection = field(default_factory=ServerSection)
    continual: ContinualSection = field(default_factory=ContinualSection)
    # Sections of plug-in methods ([fedprox], ...) given in the run's config, by section name; see
    # fedlora.extensions. Serialised beside the core sections; absent ones are at their defaults.
    plugins: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FedLoraConfig:
        cfg = cls()
        for section, values in raw.items():
            if section in _SECTIONS:
                target = getattr(cfg, section)
            elif section in plugin_sections():
                target = cfg.plugins[section] = plugin_sections()[section]()
            else:
                names = [*_SECTIONS, *sorted(plugin_sections())]
                raise ConfigError(f"unknown config section [{section}]; known sections: {', '.join(names)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table of keys, got {type(values).__name__}")
            hints = get_type_hints(type(target))
            known = {f.name for f in fields(target)}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(
                        f"unknown config key '{section}.{key}'; known keys in [{section}]: {', '.join(sorted(known))}"
                    )
                setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))
        cfg.validate()
        return cfg

    def section(self, name: str) -> Any:
        """A plug-in method's config section: as given in the run's config, else its defaults."""
        if name not in self.plugins:
            try:
                return plugin_sections()[name]()
            except KeyError:
                raise KeyError(f"no plug-in owns a config section [{name}]") from None
        return self.plugins[name]

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> FedLoraConfig:
        """Load a TOML file (or the embedded default) and apply ``key=value`` overrides."""
        raw = load_default_toml() if path is None else _read_toml(Path(path))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def validate(self) -> None:
        for obj in [*(getattr(self, s) for s in _SECTIONS), *self.plugins.values()]:
            validator = getattr(obj, "validate", None)
            if validator:
                validator()
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        """Rules across sections: refuse, before any work, what the strategy cannot do."""

        policy = policy_for(self.federation.strategy)
        ranks = sorted({self.client_rank(i) for i in range(self.federation.num_clients)})
        if len(ranks) > 1 and not policy.heterogeneous_ranks:
            why = (
                "it averages A across clients while each client keeps a private B paired with the rows of its "
                "own A, so zero-padding A would change what every B means"
                if "B" in policy.private
                else "it averages factors of one rank"
            )
            raise ConfigError(
                f"invalid config for 'federation.strategy': {self.federation.strategy} cannot mix ranks {ranks}: "
                f"{why}; use hetlora, flora or flexlora for mixed ranks"
            )
        check_privacy_with_run(self, policy)
        self._validate_dylora(policy, ranks)
        check_continual_with_run(self, policy)
        for extension in plugin_extensions():
            if extension.applies(self):
                extension.check_with_run(self, policy)
        self._validate_task(policy)
        d = self.data
        if d.partitioner == "sizes":
            _require(
                len(d.partition_sizes) == self.federation.num_clients,
                "data.partition_sizes",
                f"the 'sizes' partitioner needs one share per client: {len(d.partition_sizes)} shares for "
                f"{self.federation.num_clients} clients (federation.num_clients)",
            )
        if self.robust.trust_examples > 0:
            self._validate_trust(policy)
        if self.robust.aggregation != "mean" and policy.heterogeneous_ranks:
            raise ConfigError(
                f"invalid config value for 'robust.aggregation': {self.robust.aggregation!r} compares clients "
                f"coordinate by coordinate, but {self.federation.strategy} clients send different ranks; use "
                "robust.update_norm_bound and robust.max_client_share with heterogeneous ranks"
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("plugins")
        out.update({name: dataclasses.asdict(section) for name, section in sorted(self.plugins.items())})
        return out

    def experiment(self) -> dict[str, Any]:
        """``to_dict()`` without the keys that say where a run's files go (its name, folders, caches),
        which a run fills in: two configs with equal experiments compute the same thing."""
        d = self.to_dict()
        for key in PLACEMENT_KEYS:
            section, name = key.split(".")
            d[section].pop(name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FedLoraConfig:
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        return digest_of(self.to_json())

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def client_delta(self) -> float:
        """Client-level delta: privacy.delta, or 1 / N^1.1 (below 1/N, as a delta must be)."""
        return self.privacy.delta or 1.0 / self.federation.num_clients**1.1

    def _validate_trust(self, policy) -> None:
        """``robust.trust_examples`` needs every client to start a round from the global adapter the
        server trains from (one rank, nothing kept on the clients, nothing merged into the base)
        and the weighted mean its trust weighs: a ConfigError naming what rules it out."""
        name, why = self.federation.strategy, ""
        if policy.private:
            why = f"{name} keeps {sorted(policy.private)} on each client, so the server cannot train from where one starts"
        elif policy.merge_global_into_base or policy.heterogeneous_ranks:
            why = f"{name} gives its clients starts of their own (ranks or a merged base)"
        elif self.privacy.client_dp:
            why = "client-level DP releases the round with its own clip and noise; weights from other data break its analysis"
        elif self.dylora.enabled:
            why = "DyLoRA trains one rank per round, which the server's own update would not share"
        elif self.robust.aggregation != "mean":
            why = f"robust.aggregation = {self.robust.aggregation!r} ignores weights"
        elif self.continual.method:
            why = "a task sequence changes the server's labels and data by task"
        if why:
            raise ConfigError(f"invalid config for 'robust.trust_examples': {why}; use fedit or ffa with the mean")

    def _validate_dylora(self, policy, ranks: list[int]) -> None:
        name = self.federation.strategy
        if self.dylora.enabled:
            if policy.heterogeneous_ranks:
                raise ConfigError(
                    f"invalid config for 'dylora.enabled': DyLoRA's per-round rank replaces per-client "
                    f"ranks; {name} aggregates clients of different ranks. Use fedit, ffa or fedsa"
                )
            _require(
                self.dylora.min_rank <= self.lora.rank,
                "dylora.min_rank",
                f"({self.dylora.min_rank}) must not exceed lora.rank ({self.lora.rank})",
            )
        for r in self.dylora.eval_ranks:
            _require(r <= max(ranks), "dylora.eval_ranks", f"rank {r} is above the run's largest rank {max(ranks)}")

    def _validate_task(self, policy) -> None:
        m, d = self.model, self.data
        if m.task != "causal-lm":
            return
        if d.instruction:
            raise ConfigError(
                "invalid config value for 'data.instruction': it is a classifier's task cue; a causal "
                "LM's prompt is data.prompt_template (with {labels} for the options)"
            )
        if d.prompt_format != "label" and d.partitioner not in ("iid", "sizes"):
            raise ConfigError(
                f"invalid config value for 'data.partitioner': {d.partitioner!r} splits clients by "
                f"label, but data.prompt_format={d.prompt_format!r} rows carry no label; use 'iid' "
                "(or the 'label' format for classification data)"
            )
        if self.continual.enabled:
            raise ConfigError(
                "invalid config for 'continual.method': task sequences are built for classification "
                "(model.task='classification'); a causal-lm task sequence is not built yet"
            )
        if m.quantization != "none" and policy.merge_global_into_base:
            raise ConfigError(
                f"invalid config for 'model.quantization': {self.federation.strategy} merges each "
                f"round's global update into the base weights, which a {m.quantization} quantized base "
                "cannot take exactly; use fedit, fedsa, ffa, hetlora or flexlora with a quantized base"
            )

    def run_name(self) -> str:
        """``run.name``, or ``<dataset>-<strategy>`` when it is left empty."""
        if self.run.name:
            return self.run.name
        if self.continual.enabled:
            return f"continual-{self.continual.method}-{self.federation.strategy}"
        ds = self.data.dataset
        slug = ds.split(":", 1)[1] if ds.startswith("builtin:") else Path(ds.rstrip("/")).name or ds
        return f"{slug.replace('/', '-')}-{self.federation.strategy}"

    # ------------------------------------------------------------------ per-client view
    def client_rank(self, index: int) -> int:
        """Rank of the client with partition index ``index`` (uniform unless [hetero] says otherwise)."""
        h = self.hetero
        if h.client_ranks:
            return int(h.client_ranks[index % len(h.client_ranks)])
        cls_name = self.client_class(index)
        if cls_name:
            return int(h.device_classes[cls_name])
        return self.lora.rank

    def client_class(self, index: int) -> str:
        h = self.hetero
        if h.client_classes:
            return h.client_classes[index % len(h.client_classes)]
        if h.class_distribution:
            # Deterministic assignment: contiguous blocks in the order the classes are listed.
            n = self.federation.num_clients
            edges, acc = [], 0.0
            for name, share in h.class_distribution.items():
                acc += share
                edges.append((round(acc * n), name))
            for edge, name in edges:
                if index < edge:
                    return name
            return edges[-1][1]
        return ""


_SECTIONS = [f.name for f in fields(FedLoraConfig) if f.name != "plugins"]
PLACEMENT_KEYS = ("run.name", "run.output_dir", "model.cache_dir", "simulation.state_dir")


def digest_of(config_json: str) -> str:
    """The short digest that names a run config in every train/evaluate message."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def _all_sections(cfg: FedLoraConfig) -> list[tuple[str, Any]]:
    """(name, section) for every core section, then every plug-in's (given or at its defaults)."""
    return [*((s, getattr(cfg, s)) for s in _SECTIONS), *((s, cfg.section(s)) for s in sorted(plugin_sections()))]


def reference_toml(cfg: FedLoraConfig) -> str:
    """Every key of ``cfg`` as TOML, each with its help text as a comment."""
    lines = []
    for section, obj in _all_sections(cfg):
        lines.append(f"[{section}]")
        for f in fields(obj):
            lines.append(f"{f.name} = {toml_value(getattr(obj, f.name))}  # {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown(cfg: FedLoraConfig) -> str:
    """Every key of ``cfg`` as a Markdown page, one table per section (key, value in ``cfg``, help):
    docs/configuration.md is this page for the embedded default run."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `fedlora config --reference --format markdown` from the config sections in the code;",
        "the values are those of the embedded default run (`fedlora simulate` with no config). A run config",
        "is a TOML file of these sections; unknown keys and impossible values fail before any work starts.",
        "",
    ]
    for section, obj in _all_sections(cfg):
        out += [f"## [{section}]", "", "| key | default | meaning |", "|---|---|---|"]
        for f in fields(obj):
            value = toml_value(getattr(obj, f.name)).replace("|", "\\|")
            meaning = str(f.metadata.get("help", "")).replace("|", "\\|").replace("<", "&lt;")
            out.append(f"| `{f.name}` | `{value}` | {meaning} |")
        out.append("")
    return "\n".join(out)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_default_toml() -> dict[str, Any]:
    """The embedded default run (fortunes, MiniLM, 10 clients, Dirichlet 0.5)."""
    from importlib.resources import files

    return tomllib.loads(files("fedlora").joinpath("defaults.toml").read_text())


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override. The value is TOML; a bare word that is not TOML
    (``model.name=builtin:tiny-bert``) is taken as a string for convenience, but a value that starts
    like a TOML array, table or quoted string and does not parse is an error, never a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override key {dotted!r} must be section.key (e.g. lora.rank=4)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip()[:1] in ("[", "{", '"', "'"):
            raise ConfigError(
                f"override {dotted.strip()}={text}: the value is not valid TOML ({exc}); "
                'e.g. --set \'lora.target_modules=["query", "value"]\''
            ) from None
        value = text
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {dotted!r} does not name a config key")
    node[parts[-1]] = value
