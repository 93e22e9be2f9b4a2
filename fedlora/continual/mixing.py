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
  ``a = softmax(e)``. The scores ``e`` come from the model's selector (:data:`SELECTOR_PREFIX`, shared
  like the head by default), one of two routers (``continual.amlora_router``):

  - ``lora-outputs`` (:class:`AttentionSelector`, the paper as read): ``e_t = w_t . o_t + b_t``, each
    task LoRA's output through its own dense layer to one score per token; the zero LoRA's score is
    its bias alone. All of it trains on the current task's data.
  - ``input-keys`` (:class:`KeySelector`): one attention per input, from its pooled layer input's fit
    to each task's input moments (:mod:`fedlora.continual.routing`); the zero LoRA's score is a
    trained logit. Each task's moments are what its clients measured while training it (the
    current task's: the client's own running moments while it trains), averaged by the server like
    any shared part, and never trained by gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.continual import routing
from fedlora.continual.config import AMLORA_ROUTERS
from fedlora.factors import ADAPTER, SELECTOR_PREFIX, LoraFactors, lora_layers


class AttentionSelector(torch.nn.Module):
    """Router ``lora-outputs``. Per adapted module: one dense layer (out -> 1) per task slot, and the
    zero LoRA's bias."""

    router = "lora-outputs"

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

    def statistics(self) -> list[torch.nn.Parameter]:
        return []  # every part of this router trains


class KeySelector(torch.nn.Module):
    """Router ``input-keys``. Per adapted module: the zero LoRA's logit (trained) and, per task slot,
    the first and second moments of the module's pooled input (statistics: never given a gradient;
    :meth:`statistics`). All zero until a task's clients have measured them."""

    router = "input-keys"

    def __init__(self, model: torch.nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.zero = torch.nn.ParameterDict()
        self.key_mean = torch.nn.ParameterDict()
        self.key_second = torch.nn.ParameterDict()
        for name, layer in lora_layers(model):
            key = name.replace(".", "__")
            fan_in = layer.lora_A[ADAPTER].weight.shape[1]
            self.zero[key] = torch.nn.Parameter(torch.zeros(1))
            self.key_mean[key] = torch.nn.Parameter(torch.zeros(num_tasks, fan_in), requires_grad=False)
            self.key_second[key] = torch.nn.Parameter(torch.zeros(num_tasks, fan_in), requires_grad=False)

    def statistics(self) -> list[torch.nn.Parameter]:
        return [*self.key_mean.values(), *self.key_second.values()]


def attach_selector(model: torch.nn.Module, num_tasks: int, router: str = "input-keys") -> torch.nn.Module:
    """Give ``model`` an AM-LoRA selector of ``router`` (a submodule, so it moves with ``.to(device)``)."""
    kinds = {k.router: k for k in (KeySelector, AttentionSelector)}
    if router not in kinds or router not in AMLORA_ROUTERS:
        raise ValueError(f"AM-LoRA's router must be one of {AMLORA_ROUTERS}, got {router!r}")
    sel = kinds[router](model, num_tasks)
    model.add_module(SELECTOR_PREFIX.rstrip("."), sel)
    return sel


def selector_of(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(model, SELECTOR_PREFIX.rstrip("."), None)


class TaskLoraMixer:
    """Installs the forward hooks; :meth:`remove` restores the model exactly (models are cached
    per process and reused by the next message)."""

    def __init__(
        self, model: torch.nn.Module, past: list[LoraFactors], mode: str = "sum", temperature: float = 1.0
    ) -> None:
        if mode not in ("sum", "attention"):
            raise ValueError(f"mode must be 'sum' or 'attention', got {mode!r}")
        self.mode, self.temperature = mode, temperature
        self.current_slot = len(past)  # the current task's slot among the selector's tasks
        self.attention: list[torch.Tensor] = []  # per forward, per layer: (..., 1 + tasks) weights
        # Routing measurement (evaluation only, when ``measuring``): the attention summed over every
        # adapted layer and token position (per input under input keys) of the forwards since
        # reset_routing(), and how many.
        self.measuring = False
        # Input keys: this forward's attention mask, and per module the current task's moment sums
        # (sum, sum of squares, count) over the training forwards since reset_keys().
        self._mask: list[torch.Tensor | None] = [None]
        self.local_moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.routing_sum: torch.Tensor | None = None
        self.routing_count = 0
        self.selector = selector_of(model) if mode == "attention" else None
        if mode == "attention" and self.selector is None:
            raise ValueError("attention mixing needs the model's AM-LoRA selector (attach_selector)")
        if mode == "attention" and len(past) + 1 > self.selector.num_tasks:
            raise ValueError(f"{len(past) + 1} tasks exceed the selector's {self.selector.num_tasks} slots")
        self._handles = []
        if isinstance(self.selector, KeySelector):
            self._handles.append(model.register_forward_pre_hook(self._keep_mask, with_kwargs=True))
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
            if isinstance(sel, KeySelector):
                logits = self._key_logits(key, x, k, module.training)
                logits = logits.reshape(logits.shape[:1] + (1,) * (x.dim() - 2) + logits.shape[-1:])
            else:
                scores = (stacked * sel.weight[key][:k]).sum(-1) + sel.bias[key][1 : k + 1]
                zero = sel.bias[key][0].expand(scores.shape[:-1] + (1,))
                logits = torch.cat([zero, scores], -1)
            att = torch.softmax(logits, -1)  # (..., 1 + k), index 0: zero LoRA
            if module.training:  # read (and cleared) by the L1 term each step; nothing piles up in eval
                self.attention.append(att)
            elif self.measuring:
                flat = att.detach().reshape(-1, att.shape[-1]).double()
                total = flat.sum(0).cpu()
                self.routing_sum = total if self.routing_sum is None else self.routing_sum + total
                self.routing_count += flat.shape[0]
            return base + (att[..., 1:].unsqueeze(-1) * stacked).sum(-2)

        return hook

    def _keep_mask(self, module, args, kwargs):
        self._mask[0] = kwargs.get("attention_mask")

    def _key_logits(self, key: str, x: torch.Tensor, k: int, training: bool) -> torch.Tensor:
        """(batch, 1 + k): the zero LoRA's logit and each task's key score of ``x``'s pooled input. In
        training the current task (slot k - 1) is scored by this client's running moments, this
        batch's included."""
        sel = self.selector
        pooled = routing.pooled_inputs(x.detach(), self._mask[0]).double()
        mean, second = sel.key_mean[key][:k].detach().double(), sel.key_second[key][:k].detach().double()
        if training:
            s1, s2, n = routing.moments(pooled)
            if key in self.local_moments:
                o1, o2, on = self.local_moments[key]
                s1, s2, n = s1 + o1, s2 + o2, n + on
            self.local_moments[key] = (s1, s2, n)
            mean, second = mean.clone(), second.clone()
            mean[k - 1], second[k - 1] = s1 / n, s2 / n
        scores = routing.key_scores(pooled, mean, second, self.temperature).to(x.dtype)
        return torch.cat([sel.zero[key].expand(scores.shape[0], 1), scores], -1)

    def reset_keys(self) -> None:
        self.local_moments.clear()

    @torch.no_grad()
    def store_keys(self) -> None:
        """Write this client's running moments into the current task's slot of the selector (what it
        sends); the other slots are left as they came."""
        slot = self.current_slot
        for key, (s1, s2, n) in self.local_moments.items():
            self.selector.key_mean[key][slot] = (s1 / n).to(self.selector.key_mean[key].dtype)
            self.selector.key_second[key][slot] = (s2 / n).to(self.selector.key_second[key].dtype)

    def reset_routing(self) -> None:
        self.routing_sum, self.routing_count = None, 0

    def routing(self) -> list[float]:
        """The mean attention (zero LoRA first, then each task's LoRA in task order) over every adapted
        layer and input (input keys) or token position, padding included (LoRA outputs), of the
        evaluation forwards since reset_routing()."""
        if self.routing_sum is None or not self.routing_count:
            return []
        return [float(v) for v in self.routing_sum / self.routing_count]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.attention.clear()
        self._mask[0] = None
