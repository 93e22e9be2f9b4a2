"""Low-rank factors: the unit fedlora exchanges.

A :class:`LoraFactors` holds, per adapted module, ``A`` (r x in) and ``B`` (out x r) with the
module's ``alpha``, plus a small named set of extra trainable tensors (a classification head).
Either factor may be absent: a FedSA client sends only A, an FFA client only B.

Extraction from and loading into a PEFT model are exact copies (bit-exact round trip); nothing
here ever touches a base weight, so nothing built from a :class:`LoraFactors` can carry one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

ADAPTER = "default"
SELECTOR_PREFIX = "fedlora_selector."  # AM-LoRA's attention selector (fedlora.continual.mixing)


def extra_part(name: str) -> str:
    """The sharing part an extra tensor belongs to: 'selector' (AM-LoRA) or 'head'."""
    return "selector" if name.startswith(SELECTOR_PREFIX) else "head"


PEFT_PREFIX = "base_model.model."
_SAVE_WRAPPER = ".modules_to_save." + ADAPTER


@dataclass
class ModuleFactors:
    """The LoRA factors of one adapted module: delta W = (alpha / r) * B @ A."""

    A: torch.Tensor | None
    B: torch.Tensor | None
    alpha: float

    @property
    def rank(self) -> int:
        if self.A is not None:
            return int(self.A.shape[0])
        if self.B is not None:
            return int(self.B.shape[1])
        raise ValueError("module has neither A nor B")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update this module adds to its base weight."""
        if self.A is None or self.B is None:
            raise ValueError("delta needs both A and B")
        return self.scaling * (self.B @ self.A)


@dataclass
class LoraFactors:
    """Factors of every adapted module of a model, keyed by module path (PEFT prefix stripped)."""

    modules: dict[str, ModuleFactors] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, parts: Iterable[str]) -> LoraFactors:
        """Keep only the named parts ('A', 'B', 'head'); the others are dropped, not zeroed."""
        parts = set(parts)
        return LoraFactors(
            modules={
                name: ModuleFactors(A=m.A if "A" in parts else None, B=m.B if "B" in parts else None, alpha=m.alpha)
                for name, m in self.modules.items()
                if ("A" in parts and m.A is not None) or ("B" in parts and m.B is not None)
            },
            extras={k: v for k, v in self.extras.items() if extra_part(k) in parts},
        )

    def merged_with(self, other: LoraFactors) -> LoraFactors:
        """Parts of ``other`` override (or fill in) parts of ``self``."""
        modules = {}
        for name in self.modules.keys() | other.modules.keys():
            a, b = self.modules.get(name), other.modules.get(name)
            if a is None or b is None:
                modules[name] = a or b
                continue
            modules[name] = ModuleFactors(
                A=b.A if b.A is not None else a.A, B=b.B if b.B is not None else a.B, alpha=b.alpha
            )
        return LoraFactors(modules=modules, extras={**self.extras, **other.extras})

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Flat (key, tensor) view in a stable order: '<module>/A', '<module>/B', 'head/<name>'."""
        for name in sorted(self.modules):
            m = self.modules[name]
            if m.A is not None:
                yield f"{name}/A", m.A
            if m.B is not None:
                yield f"{name}/B", m.B
        for name in sorted(self.extras):
            yield f"head/{name}", self.extras[name]

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor], alpha: dict[str, float]) -> LoraFactors:
        """Inverse of :meth:`tensors`: '<module>/A', '<module>/B' and 'head/<name>' keys."""
        out = cls()
        for key, t in flat.items():
            if key.startswith("head/"):
                out.extras[key[len("head/") :]] = t
                continue
            module, sep, part = key.rpartition("/")
            if not sep or part not in ("A", "B"):
                raise ValueError(f"{key!r} is not a factor key ('<module>/A', '<module>/B' or 'head/<name>')")
            m = out.modules.setdefault(module, ModuleFactors(A=None, B=None, alpha=float(alpha[module])))
            setattr(m, part, t)
        return out

    def numel(self) -> int:
        return sum(t.numel() for _, t in self.tensors())

    def parts(self) -> set[str]:
        out = set()
        for m in self.modules.values():
            if m.A is not None:
                out.add("A")
            if m.B is not None:
                out.add("B")
        out.update(extra_part(k) for k in self.extras)
        return out

    def clone(self) -> LoraFactors:
        return LoraFactors(
            modules={
                n: ModuleFactors(
                    A=None if m.A is None else m.A.detach().clone(),
                    B=None if m.B is None else m.B.detach().clone(),
                    alpha=m.alpha,
                )
                for n, m in self.modules.items()
            },
            extras={n: t.detach().clone() for n, t in self.extras.items()},
        )


# ---------------------------------------------------------------------------------------------
# PEFT model <-> LoraFactors
# ---------------------------------------------------------------------------------------------
def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(module path without PEFT's prefix, LoraLayer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield _strip(name), module


def head_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Trainable non-LoRA parameters that travel as extras: what PEFT saves with the adapter
    (``modules_to_save``, e.g. the head) and AM-LoRA's selector (names start with SELECTOR_PREFIX)."""
    for name, param in model.named_parameters():
        if _SAVE_WRAPPER in name:
            yield _strip(name).replace(_SAVE_WRAPPER, ""), param
        elif name.startswith(SELECTOR_PREFIX):
            yield name, param


def extract_factors(model: torch.nn.Module, with_head: bool = True) -> LoraFactors:
    """Copy the LoRA factors (and the head) out of a PEFT model."""
    modules = {
        name: ModuleFactors(
            A=layer.lora_A[ADAPTER].weight.detach().clone(),
            B=layer.lora_B[ADAPTER].weight.detach().clone(),
            alpha=float(layer.lora_alpha[ADAPTER]),
        )
        for name, layer in lora_layers(model)
    }
    extras = {n: p.detach().clone() for n, p in head_parameters(model)} if with_head else {}
    return LoraFactors(modules=modules, extras=extras)


def seeded_A(seed: int, module: str, rank: int, fan_in: int) -> torch.Tensor:
    """The A every party rebuilds from ``seed`` alone for ``module``: PEFT's default init
    (Kaiming-uniform, a=sqrt(5), bound 1/sqrt(fan_in)) from a generator seeded by (seed, module).
    Rank prefixes agree: A of rank 4 is the first 4 rows of A of rank 8 (up to rank 64)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    bound = 1.0 / (fan_in**0.5)
    full = torch.rand((max(rank, 64), fan_in), generator=gen) * 2 * bound - bound
    return full[:rank].clone()


class FactorShapeError(ValueError):
    """Factors whose names or shapes do not fit the model they are loaded into."""


@torch.no_grad()
def load_factors(model: torch.nn.Module, factors: LoraFactors) -> None:
    """Copy factors into a PEFT model in place. Parts absent from ``factors`` are left untouched.

    Raises :class:`FactorShapeError` naming the module if a name is unknown or a shape differs,
    before anything is written.
    """
    layers = dict(lora_layers(model))
    heads = dict(head_parameters(model))
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, m in factors.modules.items():
        layer = layers.get(name)
        if layer is None:
            raise FactorShapeError(f"no LoRA module named {name!r} in the model")
        for part, src, dst in (("A", m.A, layer.lora_A[ADAPTER].weight), ("B", m.B, layer.lora_B[ADAPTER].weight)):
            if src is None:
                continue
            if tuple(src.shape) != tuple(dst.shape):
                raise FactorShapeError(
                    f"{name}/{part}: shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}"
                )
            plan.append((dst, src))
    for name, t in factors.extras.items():
        dst = heads.get(name)
        if dst is None:
            raise FactorShapeError(f"no trainable head tensor named {name!r} in the model")
        if tuple(t.shape) != tuple(dst.shape):
            raise FactorShapeError(f"head/{name}: shape {tuple(t.shape)} does not fit the model's {tuple(dst.shape)}")
        plan.append((dst, t))
    for dst, src in plan:
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
