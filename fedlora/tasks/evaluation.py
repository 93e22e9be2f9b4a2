"""Evaluating a causal LM: held-out loss and perplexity on the response tokens, and, for
classification rows phrased as instructions, the accuracy of greedily generated labels.

A generated answer counts when its first line, case-folded and with all whitespace removed (and
trailing punctuation dropped), equals a label name treated the same way: " Sports.\\n" and
"sports" both name "Sports", and a word-piece tokenizer's "sci / tech" names "Sci/Tech". An
answer that names no label, or names one only after other words, is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.data import batches
from fedlora.model import load_tokenizer
from fedlora.tasks.causal import AnswerSpec
from fedlora.tasks.causal_maths import perplexity, response_nll


def normalise(text: str) -> str:
    """The form answers and label names are compared in (see the module docstring)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return "".join(lines[0].casefold().split()).rstrip(".,;:!?'\"")


def parse_label(text: str, label_names: Sequence[str]) -> int | None:
    """The index of the label a generated answer names, or None."""
    answer = normalise(text)
    if not answer:
        return None
    for i, name in enumerate(label_names):
        if normalise(name) == answer:
            return i
    return None


@torch.no_grad()
def generate_answers(model: torch.nn.Module, data, batch_size: int, device: torch.device) -> list[str]:
    """Greedy answers to the prompts of ``data`` (left-padded batches, at most
    ``max_new_tokens`` new tokens each), decoded without special tokens."""

    spec: AnswerSpec = data.answers
    tok = load_tokenizer(spec.model_name, spec.cache_dir)
    model.eval()
    texts: list[str] = []
    for s in range(0, len(data), batch_size):
        idx = range(s, min(s + batch_size, len(data)))
        prompts = [data.input_ids[i][: int(data.prompt_lengths[i])].long() for i in idx]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), spec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[j, width - len(p) :] = p
            mask[j, width - len(p) :] = 1
        new = max(1, min(spec.max_new_tokens, spec.context - width))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=spec.pad_id,
            eos_token_id=spec.eos_id,
        )
        texts += tok.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    return texts


@torch.no_grad()
def evaluate_causal(model: torch.nn.Module, data, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss (mean cross-entropy per response token) and perplexity; accuracy of the generated
    labels when the examples are classification rows (``data.answers``)."""

    model.eval()
    nll, tokens = 0.0, 0
    for batch, labels in batches(data, batch_size, shuffle=False):
        per_token, scored = response_nll(model(**{k: v.to(device) for k, v in batch.items()}).logits, labels.to(device))
        nll += float(per_token.sum())
        tokens += int(scored.sum())
    loss = nll / max(tokens, 1)
    out = {"loss": loss, "perplexity": perplexity(loss), "num-examples": len(data), "tokens": tokens}
    if data.answers is not None and len(data):
        answers = generate_answers(model, data, batch_size, device)
        names = data.answers.label_names
        hits = [parse_label(a, names) == int(y) for a, y in zip(answers, data.labels)]
        out["accuracy"] = sum(hits) / len(hits)
        out["unparsed"] = sum(parse_label(a, names) is None for a in answers) / len(answers)
    return out
