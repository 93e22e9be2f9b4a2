"""A frozen classification head built from the encoder's own reading of each label name.

A trainable head forgets too (its rows for earlier tasks' labels drift while later tasks train) and
can hide what the adapters do. This head cannot forget: row c is the feature the classifier sees
(its input, e.g. BERT's pooled [CLS]) for the text of label c's name under the base model,
L2-normalised; the bias is zero. Logits are then the agreement of an input's feature with each
label name's, the way T5's frozen vocabulary serves O-LoRA. It is rebuilt identically by the server
and every client from the base weights, so it never travels.

With ``scale > 0`` the input feature is L2-normalised too and the logits are ``scale`` times the
cosines (CLIP's temperature). Without it, a softmax over cosines in [-1, 1] is nearly uniform: the
loss barely moves the features, and what decides a prediction is whichever label name the base
features of every input happen to lie closest to, so every input gets the same label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classifier_of(model: torch.nn.Module) -> torch.nn.Linear:
    for attr in ("classifier", "score"):
        mod = getattr(model, attr, None)
        if isinstance(mod, torch.nn.Linear):
            return mod
    raise ValueError(
        f"{type(model).__name__} has no linear classifier ('classifier' or 'score'); a frozen "
        "label-name head needs one: set continual.head = 'trainable'"
    )


@torch.no_grad()
def install_label_name_head(
    model: torch.nn.Module, tokenizer, label_names: list[str], scale: float = 0.0
) -> torch.Tensor:
    """Set (and freeze) ``model``'s classifier to the label-name features, its input scaled to
    ``scale`` times the unit vector when ``scale > 0``; returns the weight."""
    head = classifier_of(model)
    if head.out_features != len(label_names):
        raise ValueError(f"the classifier has {head.out_features} outputs for {len(label_names)} label names")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(list(label_names), padding=True, return_tensors="pt")
        dev = head.weight.device
        model(**{k: v.to(dev) for k, v in enc.items()})
    finally:
        handle.remove()
        model.train(was_training)
    feats = seen[0]
    if feats.dim() == 3:  # a head fed token features: the first token's
        feats = feats[:, 0]
    head.weight.copy_(F.normalize(feats.float(), dim=-1).to(head.weight.dtype))
    if head.bias is not None:
        head.bias.zero_()
    head.weight.requires_grad_(False)
    if head.bias is not None:
        head.bias.requires_grad_(False)
    if scale > 0:
        head.register_forward_pre_hook(lambda mod, args: (scale * F.normalize(args[0], dim=-1), *args[1:]))
    return head.weight.detach().clone()
