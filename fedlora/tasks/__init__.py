"""Task types: what a model is trained to do and how it is scored.

``model.task = "classification"`` (the default: a sequence classifier, cross-entropy over labels,
accuracy) lives in :mod:`fedlora.training` and :mod:`fedlora.data`; ``"causal-lm"`` (instruction
tuning of a decoder LM) in :mod:`fedlora.tasks.causal` (formats, tokens, loss) and
:mod:`fedlora.tasks.evaluation` (perplexity, generated-label accuracy). Both run through the one
training loop and the one codec: a task changes the examples and the loss, never the federation.
"""
