"""Task types: what a model is trained to do and how it is scored. The core never imports this
package: it asks :func:`fedlora.registry.task_type` for ``model.task``'s object (the interface is
listed there).

``classification`` (the default: a sequence classifier, cross-entropy over labels, accuracy) is
:mod:`fedlora.tasks.classification`; ``causal-lm`` (instruction tuning of a decoder LM) is
:mod:`fedlora.tasks.causal_lm`, assembled from :mod:`fedlora.tasks.causal` (formats, tokens), :mod:`fedlora.tasks.causal_maths` (loss)
and :mod:`fedlora.tasks.evaluation` (perplexity, generated-label accuracy). Both run through the
one training loop and the one codec: a task changes the examples and the loss, never the federation.
"""
