"""Causal-LM instruction tuning: rows -> prompt and response tokens; loss on the response only.

A row becomes ``prompt`` + ``response`` (+ end-of-sequence) in one of three formats
(``data.prompt_format``):

* ``label``: a classification row phrased as an instruction by ``data.prompt_template``; the
  response is ``" <label name>"``, so accuracy is the share of greedily generated answers that
  name the right label (:mod:`fedlora.tasks.answers`);
* ``alpaca``: instruction / optional input / output columns, in the Alpaca prompt;
* ``chat``: a list of ``{role, content}`` messages rendered by the tokenizer's own chat template;
  the last message (the assistant's) is the response.

Prompt and response are tokenized separately and concatenated, so the number of prompt tokens
is exact and the training labels mask precisely those (and the padding) with ``IGNORE``
(:mod:`fedlora.tasks.causal_maths` holds that maths).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.model import load_tokenizer, model_context
from fedlora.tasks.causal_maths import fit

log = logging.getLogger("fedlora.data")


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def special_ids(tok) -> tuple[int, int]:
    """(end-of-sequence id, padding id) of ``tok``; a BERT-style tokenizer's [SEP] ends a sequence."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ConfigError(
            "the tokenizer has neither an end-of-sequence nor a separator token, so a response "
            "cannot be ended; use a causal-lm model whose tokenizer defines eos_token"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return int(eos), int(pad)


def columns_needed(cfg: FedLoraConfig) -> list[tuple[str, str]]:
    """(config key, column) pairs a dataset must hold for the run's format."""
    d = cfg.data
    if d.prompt_format == "label":
        need = [("data.text_column", d.text_column), ("data.label_column", d.label_column)]
        return need + ([("data.text_pair_column", d.text_pair_column)] if d.text_pair_column else [])
    if d.prompt_format == "alpaca":
        need = [("data.instruction_column", d.instruction_column), ("data.output_column", d.output_column)]
        return need + ([("data.input_column", d.input_column)] if d.input_column else [])
    return [("data.messages_column", d.messages_column)]


def instruction_rows(split, cfg: FedLoraConfig) -> list[dict]:
    """Rows of an alpaca or chat dataset (no labels: label 0 for the partitioners, which then split IID)."""
    d = cfg.data
    if d.prompt_format == "alpaca":
        inputs = split[d.input_column] if d.input_column else [""] * len(split)
        return [
            {"instruction": i, "input": x, "output": o, "label": 0}
            for i, x, o in zip(split[d.instruction_column], inputs, split[d.output_column])
        ]
    return [{"messages": m, "label": 0} for m in split[d.messages_column]]


def render(row: dict, cfg: FedLoraConfig, tok, label_names: Sequence[str]) -> tuple[str, str]:
    """(prompt text, response text) of one row."""
    d = cfg.data
    if d.prompt_format == "label":
        prompt = d.prompt_template.format(
            text=row["text"], text_pair=row.get("pair") or "", labels=", ".join(label_names)
        )
        return prompt, " " + label_names[int(row["label"])]
    if d.prompt_format == "alpaca":
        x = str(row.get("input") or "").strip()
        template = ALPACA_PROMPT if x else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=str(row["instruction"]).strip(), input=x), str(row["output"])
    return _render_chat(row["messages"], tok)


def check_chat_template(tok, model_name: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"data.prompt_format='chat' renders messages with the tokenizer's chat template, but "
            f"{model_name}'s tokenizer has none; use a chat model's tokenizer or "
            "data.prompt_format='alpaca'"
        )


def _render_chat(messages, tok) -> tuple[str, str]:
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise ConfigError(
            f"a chat row must be a non-empty list of {{role, content}} messages, got {str(messages)[:80]!r}"
        )
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            f"a chat row's last message is the response and must be the assistant's, got role {messages[-1]['role']!r}"
        )
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template renders the conversation differently from its prompt "
            "(the rendered prompt is not a prefix of the whole), so the response cannot be isolated"
        )
    return prompt, full[len(prompt) :]


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode(tok, rows: list[dict], cfg: FedLoraConfig, label_names: Sequence[str]) -> dict:
    """Token ids (prompt + response + eos), class labels and prompt lengths of ``rows``.

    An example longer than ``model.max_length`` loses prompt tokens from the middle (its start and
    its last ``TAIL_TOKENS`` stay), or is an error when ``data.truncate_prompts`` is false; a
    response longer than the budget is cut at its end (logged)."""
    if cfg.data.prompt_format == "chat":
        check_chat_template(tok, cfg.model.name)
    eos, _ = special_ids(tok)
    bos = tok.bos_token_id
    adds_bos = bos is not None and _first_token(tok) == bos
    limit = cfg.model.max_length
    ids, lengths, cut_prompts, cut_responses = [], [], 0, 0
    for i, row in enumerate(rows):
        p_text, r_text = render(row, cfg, tok, label_names)
        p, r = _ids(tok, p_text), _ids(tok, r_text)
        if adds_bos and (not p or p[0] != bos):
            p = [bos] + p
        if not r or r[-1] != eos:
            r = r + [eos]
        if len(p) + len(r) > limit:
            if not cfg.data.truncate_prompts:
                raise ConfigError(
                    f"example {i}: its prompt ({len(p)} tokens) and response ({len(r)}) exceed "
                    f"model.max_length={limit}; raise model.max_length (up to the model's context) "
                    "or set data.truncate_prompts=true"
                )
            p, r, cut_p, cut_r = fit(p, r, limit)
            cut_prompts += cut_p
            cut_responses += cut_r
        ids.append(torch.tensor(p + r, dtype=torch.int32))
        lengths.append(len(p))
    if cut_prompts or cut_responses:
        log.warning(
            "%d of %d prompts lost tokens from their middle and %d responses were cut to fit model.max_length=%d",
            cut_prompts,
            len(rows),
            cut_responses,
            limit,
        )
    return {
        "ids": ids,
        "labels": torch.tensor([int(r.get("label", 0)) for r in rows], dtype=torch.long),
        "prompt_lengths": torch.tensor(lengths, dtype=torch.int64),
    }


def _first_token(tok) -> int | None:
    ids = tok("a")["input_ids"]
    return ids[0] if ids else None


@dataclass(frozen=True)
class AnswerSpec:
    """What generated-label accuracy needs besides the examples: the label names, the tokenizer
    that decodes the answers, and the generation budget."""

    label_names: tuple[str, ...]
    model_name: str
    cache_dir: str
    max_new_tokens: int
    eos_id: int
    pad_id: int
    context: int  # the model's positions: prompt + new tokens never exceed it


def answer_spec(cfg: FedLoraConfig, label_names: list[str]):
    """Causal-LM classification rows: what generated-label accuracy needs (None otherwise)."""
    if cfg.model.task != "causal-lm" or cfg.data.prompt_format != "label" or not label_names:
        return None

    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    eos, pad = special_ids(tok)
    longest = max(len(tok(" " + n, add_special_tokens=False)["input_ids"]) for n in label_names)
    return AnswerSpec(
        label_names=tuple(label_names),
        model_name=cfg.model.name,
        cache_dir=cfg.model.cache_dir,
        max_new_tokens=cfg.train.max_new_tokens or longest + 2,
        eos_id=eos,
        pad_id=pad,
        context=model_context(cfg),
    )
