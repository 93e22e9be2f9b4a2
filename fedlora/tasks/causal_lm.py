"""The causal-LM task type (``model.task = "causal-lm"``) as the core's registry sees it: assembled
from :mod:`fedlora.tasks.causal` (formats, tokens), :mod:`fedlora.tasks.causal_maths` (the loss) and :mod:`fedlora.tasks.evaluation`
(perplexity, generated-label accuracy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.model_sources import check_context
from fedlora.registry import register_task_type
from fedlora.tasks.causal import answer_spec, columns_needed, encode, instruction_rows
from fedlora.tasks.causal_maths import causal_lm_loss, token_labels
from fedlora.tasks.evaluation import evaluate_causal


class CausalLM:
    """The causal-LM task type (``model.task = "causal-lm"``): instruction tuning of a decoder, the
    loss on the response tokens, perplexity and (for label rows) generated-label accuracy."""

    def columns(self, dc, cfg) -> list[tuple[str, str]]:
        return columns_needed(cfg)

    def free_rows(self, split, cfg) -> list[dict] | None:
        return None if cfg.data.prompt_format == "label" else instruction_rows(split, cfg)

    def prepare(self, cfg) -> None:

        check_context(cfg)  # before any tokenizing: model.max_length must fit the model

    def encode(self, tok, rows: list[dict], cfg, label_names: Sequence[str]) -> dict:
        return encode(tok, rows, cfg, label_names)

    def answers(self, cfg, label_names: list[str]):
        return answer_spec(cfg, label_names)

    def targets(self, ex, ids: torch.Tensor, mask: torch.Tensor, idx: list[int]) -> torch.Tensor:
        lengths = ex.prompt_lengths[idx] if idx else ex.prompt_lengths[:0]
        return token_labels(ids, mask, lengths)

    loss = staticmethod(causal_lm_loss)

    def evaluate(self, model: torch.nn.Module, data, batch_size: int, device: torch.device) -> dict[str, float]:
        return evaluate_causal(model, data, batch_size, device)


register_task_type("causal-lm", CausalLM())
