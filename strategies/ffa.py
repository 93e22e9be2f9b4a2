"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313).

A is initialised once, non-zero, from a seed the server and every client share, then frozen: it
is never trained and never sent (each client rebuilds it from ``lora.init_seed``). Clients train
and send only B (and the head); the server averages B. With A common and fixed, the average of
the products equals the product of the averages: aggregation is exact, and upload halves.
"""

from __future__ import annotations

from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy


@register_strategy("ffa")
class FFALoRA(LoraStrategy):
    """The base's fold as it is: the weighted mean of s*B and the head (A never travels)."""
