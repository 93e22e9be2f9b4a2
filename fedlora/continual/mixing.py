"""Past tasks' LoRAs in the forward pass: added (IncLoRA, O-LoRA) or mixed by attention (AM-LoRA).

The PEFT adapter ``default`` is always the *current* task's LoRA: the one that trains and travels,
so factors, codec, sharing policy and strategies stay as they are. Earlier tasks' LoRAs are frozen
tensors held here and applied by forward hooks on each LoRA layer:

* ``sum``: the layer adds every past task's ``s_t * B_t A_t x'`` (O-LoRA's code concatenates the
  past LoRAs along the rank dimension into one frozen LoRA; with each B_t carrying its scaling, the
  concatenation is exactly this sum, and that is how it is computed: one matmul pair). ``x'`` is
  the input after the layer's ``lora_dropout``, the very tensor the current LoRA sees: O-LoRA's
  ``lora.py`` applies ``lora_dropout`` to the input once and feeds the result to both the past
  (``lora_A/B``) and the new (``loranew_A/B``) factors. Dropout is the identity in evaluation, so
  this matters only while training;
* ``attention`` (AM-LoRA): the layer's output is ``base(x) + sum_t a_t(x) o_t(x)`` over the task
  LoRAs' outputs ``o_t`` (past ones and the current one) and a zero LoRA (index 0, output 0), with
  ``a = softmax(e)``, ``e_t = w_t . o_t + b_t`` (each task LoRA's output through its own dense layer
  to one score; the zero LoRA's score is its bias alone). The dense layers form the selector, a
  trainable part of its own (:data:`SELECTOR_PREFIX`), shared like the head by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.factors import ADAPTER, SELECTOR_PREFIX, LoraFactors, lora_layers


class AttentionSelector(torch.nn.Module):
    """Per adapted module: one dense layer (out -> 1) per task slot, and the zero LoRA's bias."""

    def __init__(self, model: torch.nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.weight = torch.nn.ParameterDict()
        self.bias = torch.nn.ParameterDict()
        for name, layer in lora_layers(model):
            key = name.replace(".", "__")
            out = layer.lora_B[ADAPTER].weight.shape[0]
            # Zero init: uniform attention over the zero LoRA and the tasks learned so far.
            self.weight[key] = torch.nn.Parameter(torch.zeros(num_tasks, out))
            self.bias[key] = torch.nn.Parameter(torch.zeros(num_tasks + 1))


def attach_selector(model: torch.nn.Module, num_tasks: int) -> AttentionSelector:
    """Give ``model`` an AM-LoRA selector (a submodule, so it moves with ``.to(device)``)."""
    sel = AttentionSelector(model, num_tasks)
    model.add_module(SELECTOR_PREFIX.rstrip("."), sel)
    return sel


def selector_of(model: torch.nn.Module) -> AttentionSelector | None:
    return getattr(model, SELECTOR_PREFIX.rstrip("."), None)


class TaskLoraMixer:
    """Installs the forward hooks; :meth:`remove` restores the model exactly (models are cached
    per process and reused by the next message)."""

    def __init__(self, model: torch.nn.Module, past: list[LoraFactors], mode: str = "sum") -> None:
        if mode not in ("sum", "attention"):
            raise ValueError(f"mode must be 'sum' or 'attention', got {mode!r}")
        self.mode = mode
        self.attention: list[torch.Tensor] = []  # per forward, per layer: (..., 1 + tasks) weights
        # Routing measurement (evaluation only, when ``measuring``): the attention summed over every
        # adapted layer and token position of the forwards since reset_routing(), and how many.
        self.measuring = False
        self.routing_sum: torch.Tensor | None = None
        self.routing_count = 0
        self.selector = selector_of(model) if mode == "attention" else None
        if mode == "attention" and self.selector is None:
            raise ValueError("attention mixing needs the model's AM-LoRA selector (attach_selector)")
        if mode == "attention" and len(past) + 1 > self.selector.num_tasks:
            raise ValueError(f"{len(past) + 1} tasks exceed the selector's {self.selector.num_tasks} slots")
        self._handles = []
        for name, layer in lora_layers(model):
            ws = [(p.modules[name].A, p.modules[name].scaling * p.modules[name].B) for p in past]
            device = layer.lora_A[ADAPTER].weight.device
            ws = [(a.to(device), b.to(device)) for a, b in ws]
            if mode == "sum":
                if not ws:
                    continue
                a_cat = torch.cat([a for a, _ in ws], 0)
                b_cat = torch.cat([b for _, b in ws], 1)
                dropped: list[torch.Tensor] = []  # the layer's dropped input of this forward, if any
                self._handles.append(
                    layer.lora_dropout[ADAPTER].register_forward_hook(
                        lambda mod, args, out, slot=dropped: slot.append(out)
                    )
                )
                self._handles.append(layer.register_forward_hook(self._sum_hook(a_cat, b_cat, dropped)))
            else:
                self._handles.append(layer.register_forward_hook(self._attention_hook(name, layer, ws)))

    @staticmethod
    def _sum_hook(a_cat: torch.Tensor, b_cat: torch.Tensor, dropped: list[torch.Tensor]):
        def hook(module, args, output):
            # The current LoRA's dropped input when the layer computed one in this forward (PEFT skips
            # the LoRA branch of a merged or disabled adapter); the raw input otherwise.
            x = dropped.pop() if dropped else args[0]
            dropped.clear()
            x = x.to(a_cat.dtype)
            return output + F.linear(F.linear(x, a_cat), b_cat).to(output.dtype)

        return hook

    def _attention_hook(self, name: str, layer: torch.nn.Module, past: list[tuple[torch.Tensor, torch.Tensor]]):
        key = name.replace(".", "__")
        sel = self.selector

        def hook(module, args, output):
            x = args[0]
            base = module.base_layer(x)
            a, b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            current = b(a(module.lora_dropout[ADAPTER](x))) * module.scaling[ADAPTER]
            outs = [F.linear(F.linear(x, pa), pb) for pa, pb in past] + [current]  # task order
            k = len(outs)
            stacked = torch.stack(outs, -2)  # (..., k, out)
            scores = (stacked * sel.weight[key][:k]).sum(-1) + sel.bias[key][1 : k + 1]
            zero = sel.bias[key][0].expand(scores.shape[:-1] + (1,))
            att = torch.softmax(torch.cat([zero, scores], -1), -1)  # (..., 1 + k), index 0: zero LoRA
            if module.training:  # read (and cleared) by the L1 term each step; nothing piles up in eval
                self.attention.append(att)
            elif self.measuring:
                flat = att.detach().reshape(-1, att.shape[-1]).double()
                total = flat.sum(0).cpu()
                self.routing_sum = total if self.routing_sum is None else self.routing_sum + total
                self.routing_count += flat.shape[0]
            return base + (att[..., 1:].unsqueeze(-1) * stacked).sum(-2)

        return hook

    def reset_routing(self) -> None:
        self.routing_sum, self.routing_count = None, 0

    def routing(self) -> list[float]:
        """The mean attention (zero LoRA first, then each task's LoRA in task order) over every adapted
        layer and token position (padding included) of the evaluation forwards since reset_routing()."""
        if self.routing_sum is None or not self.routing_count:
            return []
        return [float(v) for v in self.routing_sum / self.routing_count]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.attention.clear()
