"""The classification task type (``model.task = "classification"``, the default): a sequence
classifier over the run's labels, cross-entropy, accuracy. Registered with the core's task-type
registry; the reference for a new task type (the interface is listed in :mod:`fedlora.registry`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.config import ConfigError
from fedlora.data import batches
from fedlora.registry import register_task_type
from fedlora.training import cross_entropy_loss


class Classification:
    def columns(self, dc, cfg) -> list[tuple[str, str]]:
        return [
            ("data.text_column", dc.text_column),
            ("data.label_column", dc.label_column),
            ("data.text_pair_column", dc.text_pair_column),
        ]

    def free_rows(self, split, cfg) -> None:
        return None  # every row has a label

    def prepare(self, cfg) -> None:
        return None

    def encode(self, tok, rows: list[dict], cfg, label_names: list[str]) -> dict:
        texts = [r["text"] for r in rows]
        if cfg.data.instruction:  # a task cue before the text; truncation then cuts the text's end (single texts)
            cue = cfg.data.instruction.format(labels=", ".join(label_names))
            cue_tokens = len(tok(cue)["input_ids"])
            if cue_tokens >= cfg.model.max_length - 1:
                raise ConfigError(
                    f"invalid config value for 'data.instruction': the cue alone is {cue_tokens} tokens, "
                    f"leaving no room for the text in model.max_length={cfg.model.max_length}"
                )
            texts = [f"{cue}\n{t}" for t in texts]
        pairs = [r.get("pair") for r in rows]
        enc = tok(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=cfg.model.max_length,
        )
        return {
            "ids": [torch.tensor(x, dtype=torch.int32) for x in enc["input_ids"]],
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
        }

    def answers(self, cfg, label_names: list[str]) -> None:
        return None

    def targets(self, ex, ids: torch.Tensor, mask: torch.Tensor, idx: list[int]) -> torch.Tensor:
        return ex.labels[idx] if idx else ex.labels[:0]

    loss = staticmethod(cross_entropy_loss)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data, batch_size: int, device: torch.device) -> dict[str, float]:

        model.eval()
        loss, correct, n = 0.0, 0, 0
        for batch, labels in batches(data, batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = labels.to(device)
            logits = model(**batch).logits
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
        return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "num-examples": n}


register_task_type("classification", Classification())
