"""fedlora: federated and continual LoRA fine-tuning on Flower.

Only low-rank factors (and, where a strategy's sharing policy says so, the task head) ever cross
the wire. Heavy dependencies (torch, transformers, peft, flwr) are imported by the modules that
use them, so ``import fedlora`` and the CLI start fast.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path

# In a source checkout the design card keeps clients/, server/ and strategies/ beside fedlora/,
# and the build installs them as fedlora.clients, fedlora.server, fedlora.strategies. Let the same
# names resolve when this folder is imported straight from the checkout (tests, Ray workers).
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "strategies").is_dir() and (_root / "strategies" / "base.py").is_file():
    __path__.append(str(_root))
