"""fedlora's strategies (installed as ``fedlora.strategies``): one file, one registered class each.

Every strategy subclasses :class:`~fedlora.strategies.base.LoraStrategy` (on Flower's ``FedAvg``)
and declares a :class:`~fedlora.sharing.SharingPolicy`; the factor maths live in
:mod:`fedlora.lora_math`.
"""

from fedlora.strategies.base import LoraStrategy, Update
from fedlora.validation import RejectedReply
from fedlora.strategies.fedit import FedIT
from fedlora.strategies.fedsa import FedSALoRA
from fedlora.strategies.ffa import FFALoRA
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.hetlora import HetLoRA

__all__ = ["LoraStrategy", "RejectedReply", "Update", "FedIT", "FedSALoRA", "FFALoRA", "HetLoRA", "FLoRA", "FlexLoRA"]
