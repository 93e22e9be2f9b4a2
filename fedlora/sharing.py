"""What a strategy shares, keeps private and freezes: declared once, obeyed by the client.

Every strategy class carries a :class:`SharingPolicy`. The client reads the policy for the run's
strategy and acts on it; no client code branches on strategy names.

Parts are ``"A"`` (LoRA down-projections), ``"B"`` (up-projections), ``"head"`` (the task
head, PEFT's ``modules_to_save``) and ``"selector"`` (AM-LoRA's attention over task LoRAs, present
only in such runs). A policy that does not place the selector puts it where it puts the head: it
is a small dense layer trained with the adapter, and federated like the head by default.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("A", "B", "head", "selector")


@dataclass(frozen=True)
class SharingPolicy:
    shared: frozenset[str]
    """Sent by the client after local training, aggregated by the server, sent back next round."""
    private: frozenset[str] = frozenset()
    """Kept by each client in its client-state store across rounds (also rounds it is not sampled)."""
    frozen: frozenset[str] = frozenset()
    """Never trained; every client rebuilds it from the run's shared seed, so it never travels."""
    merge_global_into_base: bool = False
    """FLoRA: the server's global delta is merged into the base weights and every round starts a
    fresh adapter (A from the round's seed, B = 0)."""
    heterogeneous_ranks: bool = False
    """Clients may train different ranks; the strategy sends each client factors of its own rank."""

    def __post_init__(self) -> None:
        if "selector" not in self.shared | self.private | self.frozen:
            for attr in ("shared", "private", "frozen"):
                if "head" in getattr(self, attr):
                    object.__setattr__(self, attr, getattr(self, attr) | {"selector"})
        for name, parts in (("shared", self.shared), ("private", self.private), ("frozen", self.frozen)):
            unknown = set(parts) - set(PARTS)
            if unknown:
                raise ValueError(f"SharingPolicy.{name} names unknown parts {sorted(unknown)}; parts are {PARTS}")
        if self.shared & self.private or self.shared & self.frozen or self.private & self.frozen:
            raise ValueError("SharingPolicy: a part is either shared, private or frozen, never two of these")
        covered = self.shared | self.private | self.frozen
        if covered != set(PARTS):
            raise ValueError(f"SharingPolicy must place every part; missing {sorted(set(PARTS) - covered)}")

    @property
    def server_holds_model(self) -> bool:
        """Whether the server can hold a complete model: no factor stays on the clients (FedSA-LoRA's B does)."""
        return not ({"A", "B"} & self.private)

    @property
    def trained(self) -> frozenset[str]:
        return frozenset(PARTS) - self.frozen

    def describe(self) -> str:
        def j(s: frozenset[str]) -> str:
            return ",".join(p for p in PARTS if p in s) or "-"

        return f"shared={j(self.shared)} private={j(self.private)} frozen={j(self.frozen)}"
