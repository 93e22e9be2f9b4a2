"""DyLoRA's rank mask equals a true rank-b adapter, and only components < b receive gradient."""

from __future__ import annotations

import torch

from conftest import make_config
from fedlora.dylora import RankMask
from fedlora.factors import extract_factors, load_factors, lora_layers
from fedlora.model import AdapterSpec, build_peft_model


def test_rank_mask_matches_rank_b_adapter(tmp_path):
    cfg = make_config(tmp_path)
    big = build_peft_model(cfg, 4, AdapterSpec(rank=8, alpha=16.0, dropout=0.0, target_modules=("query", "value")))
    small = build_peft_model(cfg, 4, AdapterSpec(rank=3, alpha=16.0, dropout=0.0, target_modules=("query", "value")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in big.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    f = extract_factors(big)
    for m in f.modules.values():
        m.A, m.B = m.A[:3].clone(), m.B[:, :3].clone()
    load_factors(small, f)
    ids = torch.randint(0, 1000, (2, 10))
    big.eval(), small.eval()
    mask = RankMask(big)
    mask.set(3)
    out_masked = big(input_ids=ids).logits
    assert torch.allclose(out_masked, small(input_ids=ids).logits, atol=1e-5)
    big.train()
    out = big(input_ids=ids).logits.sum()
    out.backward()
    for name, p in big.named_parameters():
        if "lora_A" in name and p.grad is not None:
            assert torch.count_nonzero(p.grad[3:]) == 0 and torch.count_nonzero(p.grad[:3]) > 0
    mask.remove()
    assert all(abs(layer.scaling["default"] - 2.0) < 1e-9 for _, layer in lora_layers(big))  # 16 / 8 again
