"""The causal-LM task's pure functions: fitting prompt and response into the context, the training
labels of a batch, the per-example loss, and reading a label out of a generated answer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.tasks.causal_maths import IGNORE, TAIL_TOKENS, causal_lm_loss, fit, perplexity, token_labels
from fedlora.tasks.evaluation import normalise, parse_label


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 80), st.integers(1, 80), st.integers(4, 64))
def test_fit_keeps_within_the_limit_and_the_prompt_ends(p_len, r_len, limit):
    p, r = list(range(1000, 1000 + p_len)), list(range(r_len))
    p2, r2, cut_p, cut_r = fit(p, r, limit)
    if p_len + r_len <= limit:
        assert (p2, r2, cut_p, cut_r) == (p, r, False, False)
        return
    assert len(p2) + len(r2) == limit
    assert r2 == r[: len(r2)] and cut_r == (len(r2) < r_len)
    assert len(p2) >= min(p_len, limit // 2)  # a long response never crowds the prompt out
    if cut_p:  # the prompt's start and its last tokens (the cue before the response) are what is kept
        tail = min(TAIL_TOKENS, len(p2) // 2)
        assert p2 == p[: len(p2) - tail] + p[p_len - tail :]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 11)), min_size=1, max_size=6))
def test_token_labels_ignore_prompt_and_padding(specs):
    lengths = [n for n, _ in specs]
    prompts = [min(p, n - 1) for n, p in specs]
    width = max(lengths)
    ids = torch.arange(len(specs) * width).reshape(len(specs), width) + 5
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = token_labels(ids, mask, torch.tensor(prompts))
    for j, (n, p) in enumerate(zip(lengths, prompts)):
        expect = [IGNORE] * p + ids[j, p:n].tolist() + [IGNORE] * (width - n)
        assert labels[j].tolist() == expect


# ------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize(
    "text, label",
    [
        (" Sports", 1),
        ("sports", 1),
        ("SPORTS.\nQuestion: which", 1),
        ("  science or technology ", 3),
        ("science  or\ttechnology!", 3),
        ("sci / tech", 4),
        ("Sci/Tech", 4),
        ("\n\nWorld\n", 0),
    ],
)
def test_generated_labels_parse_despite_whitespace_and_case(text, label):
    names = ["World", "Sports", "Business", "Science or Technology", "Sci/Tech"]
    assert parse_label(text, names) == label


@pytest.mark.parametrize("text", ["", "   ", " \n ", "sportsman", "the sports", "World Sports", "business news"])
def test_answers_naming_no_label_exactly_are_wrong(text):
    assert parse_label(text, ["World", "Sports", "Business", "xxxx"]) is None


def test_only_punctuation_is_stripped_from_an_answers_end():
    assert parse_label("Tax", ["Ta", "Tax"]) == 1 and parse_label("ta.", ["Ta", "Tax"]) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["World", "Sports", "Science or Technology"]),
    st.sampled_from(["", " ", "\n", "\t "]),
    st.sampled_from(["", ".", "\n more text"]),
    st.booleans(),
)
def test_every_label_survives_padding_case_and_a_second_line(name, pad, tail, upper):
    text = pad + (name.upper() if upper else name.lower()) + tail
    assert parse_label(text, ["World", "Sports", "Science or Technology"]) == [
        "World",
        "Sports",
        "Science or Technology",
    ].index(name)
    assert normalise(name) == normalise(pad + name + pad)


def test_normalise_keeps_the_first_line_folded_and_strips_only_closing_punctuation():
    assert normalise("  \n\t ") == "" and normalise("") == ""
    assert normalise("  Science or Technology.\nmore") == "scienceortechnology"
    assert normalise("XX yes!") == "xxyes" and normalise("'Sports'") == "'sports"  # only the end is stripped


class _Out:
    def __init__(self, logits):
        self.logits = logits


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 9), st.integers(1, 8)), min_size=1, max_size=5), st.integers(0, 10**6))
def test_loss_is_each_examples_mean_over_its_response_then_the_batch_mean(specs, seed):
    g = torch.Generator().manual_seed(seed)
    width, vocab = max(n for n, _ in specs), 7
    logits = torch.randn(len(specs), width, vocab, generator=g)
    ids = torch.randint(0, vocab, (len(specs), width), generator=g)
    lengths = [n for n, _ in specs]
    prompts = [min(p, n - 1) for n, p in specs]
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = token_labels(ids, mask, torch.tensor(prompts))
    expect = []
    for j, (n, p) in enumerate(zip(lengths, prompts)):
        # token t is predicted from position t-1; the scored tokens are p..n-1
        logp = torch.log_softmax(logits[j], dim=-1)
        terms = [-float(logp[t - 1, ids[j, t]]) for t in range(max(p, 1), n)]
        expect.append(sum(terms) / len(terms) if terms else 0.0)
    got = float(causal_lm_loss(_Out(logits), labels))
    assert got == pytest.approx(sum(expect) / len(expect), rel=1e-5, abs=1e-6)


def test_perplexity_is_exp_of_the_loss_and_never_overflows():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(699.0) == pytest.approx(math.exp(699.0)) and perplexity(700.0) == math.inf


def _reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain form: cross-entropy over every position of the full float32 logits."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    width=st.integers(2, 9),
    vocab=st.integers(2, 11),
    seed=st.integers(0, 10**6),
    half=st.booleans(),
)
def test_response_nll_gathers_only_scored_rows_and_equals_the_full_cross_entropy(batch, width, vocab, seed, half):
    """Values and gradients, per token and in DP-SGD's per-example form, equal the cross-entropy over
    the whole float32 logits (bf16 logits: the same rows upcast, so the same numbers)."""
    from fedlora.tasks.causal_maths import response_nll

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, width, vocab, generator=g)
    if half:
        logits = logits.to(torch.bfloat16)
    ids = torch.randint(0, vocab, (batch, width), generator=g)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    prompts = torch.minimum(torch.randint(0, width, (batch,), generator=g), lengths)
    labels = token_labels(ids, mask, prompts)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, scored = response_nll(a, labels)
    want = _reference_nll(b, labels)
    assert got.dtype == torch.float32 and torch.equal(scored, labels[:, 1:] != IGNORE)
    assert torch.allclose(got, want, atol=1e-6)
    per_example_got = got.sum(1) / scored.sum(1).clamp(min=1)
    per_example_want = want.sum(1) / scored.sum(1).clamp(min=1)
    assert torch.allclose(per_example_got, per_example_want, atol=1e-6)
    w = torch.randn(batch, generator=g)
    (per_example_got * w).sum().backward()
    (per_example_want * w).sum().backward()
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-6)
