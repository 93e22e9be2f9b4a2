"""Adapter files in PEFT's ``save_pretrained`` format, with what a user needs to use one elsewhere:
the base model as another machine names it, and the label names."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.factors import ADAPTER, PEFT_PREFIX, SELECTOR_PREFIX, LoraFactors, extract_factors
from fedlora.model_sources import LABELS_FILE, TINY_DECODERS, _tiny_decoder, portable_reference, resolve_model_path


def save_adapter(model: torch.nn.Module, path: str | Path, model_name: str, label_names: list[str]) -> Path:
    """``save_pretrained`` plus what a user needs to use the adapter elsewhere: the base model as a
    reference another machine resolves (the hub id, not this machine's cache path) in
    ``adapter_config.json``, and the label names (and transformers' ``id2label``/``label2id``) in
    ``labels.json``; :func:`load_adapter` puts them together.
    """
    return write_adapter(path, model, extract_factors(model), model_name, label_names)


def write_adapter(
    path: str | Path, structure: torch.nn.Module, factors: LoraFactors, model_name: str, label_names: list[str]
) -> Path:
    """``factors`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    the files ``save_pretrained`` writes, in PEFT's key names) without a model holding them:
    ``structure`` (a PEFT model, or its weightless :func:`skeleton_peft_model`) gives the LoRA
    config; rank and alpha are the factors' own. Also ``labels.json`` (see :func:`save_adapter`)."""
    import copy
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    first = next(iter(factors.modules.values()))
    lcfg = copy.deepcopy(structure.peft_config[ADAPTER])
    lcfg.r, lcfg.lora_alpha = int(first.rank), float(first.alpha)
    lcfg.base_model_name_or_path = portable_reference(model_name)
    lcfg.save_pretrained(str(path))
    tensors = {}
    for name, m in factors.modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.B.detach().float().cpu().contiguous()
    for name, v in factors.extras.items():
        if not name.startswith(SELECTOR_PREFIX):  # AM-LoRA's selector is not a PEFT module
            tensors[f"{PEFT_PREFIX}{name}"] = v.detach().float().cpu().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    labels = {
        "names": list(label_names),
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    (path / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    return path


def load_adapter(path: str | Path, base_model: str | None = None) -> torch.nn.Module:
    """A saved adapter as a ready classifier: its base model (the hub id it records, or
    ``base_model``), its LoRA and head, and its label names as ``config.id2label``::

        model = fedlora.model.load_adapter("runs/<run>/adapter")
    """
    import json

    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    adapter_cfg = json.loads((path / "adapter_config.json").read_text())
    if adapter_cfg.get("task_type") == "CAUSAL_LM":  # a decoder: no labels on the model itself
        from peft import AutoPeftModelForCausalLM

        name = base_model or adapter_cfg.get("base_model_name_or_path", "")
        if name in TINY_DECODERS:
            return PeftModel.from_pretrained(_tiny_decoder(name), str(path))
        if base_model is None:
            return AutoPeftModelForCausalLM.from_pretrained(str(path))
        from transformers import AutoModelForCausalLM

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(name)), str(path))
    names = json.loads((path / LABELS_FILE).read_text())["names"]
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if base_model is None:
        return AutoPeftModelForSequenceClassification.from_pretrained(str(path), **labels)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(base_model), **labels)
    return PeftModel.from_pretrained(base, str(path))
