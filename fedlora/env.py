"""Process environment fedlora needs before Flower, Ray or Hugging Face are imported."""

import os

# Flower phones home and, in deployment, installs the app's dependencies per run (CUDA torch from
# an open spec); Ray warns about accelerator env vars. Users can still override each of these.
DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def apply_defaults(offline: bool = False) -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_transformers() -> None:
    """transformers' per-load report and progress bar say nothing a fedlora user can act on (the
    classifier it calls MISSING is the head PEFT trains); warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("FEDLORA_VERBOSE_TRANSFORMERS"):
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
