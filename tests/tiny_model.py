"""A pure-torch stand-in of a PEFT classifier for unit tests of training hooks: token ids in,
``.logits`` out, with a frozen embedding, dropout, LoRA-named trainable factors and a head. It
builds in milliseconds, so the hooks' maths can be mutation-tested without loading a transformer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedlora.data import Examples


class TinyClassifier(torch.nn.Module):
    def __init__(self, num_labels: int, vocab: int = 30522, dim: int = 6, seed: int = 0, dropout: float = 0.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.emb.weight.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(2, dim, generator=g))
        self.lora_B = torch.nn.Parameter(torch.randn(num_labels, 2, generator=g) * 0.5)
        self.head = torch.nn.Linear(dim, num_labels)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        m = attention_mask.unsqueeze(-1).float()
        h = self.drop((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1))
        return SimpleNamespace(logits=self.head(h) + (h @ self.lora_A.T) @ self.lora_B.T)


def tiny_examples(n: int, num_labels: int, seed: int = 0, vocab: int = 30522) -> Examples:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in range(n)]
    return Examples(input_ids=ids, labels=torch.randint(0, num_labels, (n,), generator=g), task="classification")


def hook_context(model: torch.nn.Module, params: list, **given):
    """A ``TrainContext`` for driving a training hook by hand: the model and the parameters it
    trains; the loop's other fields empty (no optimizer, data or batches, seed 0, 0 steps) unless
    ``given``."""
    from fedlora.training import TrainContext

    empty = {
        "optimizer": None,
        "data": None,
        "tc": None,
        "seed": 0,
        "device": None,
        "target_steps": 0,
        "batch_source": None,
    }
    return TrainContext(model=model, params=params, **{**empty, **given})
