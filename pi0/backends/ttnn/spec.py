"""The TTNN backend as `pi0.backends.factory` builds it: pi0 / pi0.5 in ttnn ops, on a Tenstorrent card or emulated
on the host through ttnn's own reference functions (needs `pip install 'pi0[ttnn]'`, under Python 3.12)."""

from __future__ import annotations

import torch

from pi0.model.backend import LoadHook
from pi0.model.config import Pi0Config
from pi0.model.fast_config import refuse_fast

try:
    import ttnn  # noqa: F401  (the message below, not a bare ImportError from deep inside)
except ImportError as e:  # pragma: no cover - depends on the Python in use
    raise ImportError(f"backend 'ttnn' needs Tenstorrent's ttnn package ({e}): pip install 'pi0[ttnn]' under "
                      "Python 3.12 (ttnn ships wheels for 3.10 and 3.12; pi0 needs 3.11+)") from e

from pi0.backends.ttnn.model import Pi0TTNN  # noqa: E402
from pi0.backends.ttnn.runtime import open_runtime  # noqa: E402


def state_device(device: str | torch.device) -> torch.device:
    """The canonical tensors are read on the host; `build` places them on the card (or the host executor)."""
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """float32: every tensor in fp32 (the logic, checked exactly); bfloat16 or auto: the device's formats (bf16
    activations, bfloat8_b MLP weights: `pi0.backends.ttnn.weights.FORMATS`)."""
    names = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    chosen = names.get(dtype) if isinstance(dtype, str) else dtype
    if chosen not in (torch.bfloat16, torch.float32):
        raise ValueError(f"backend 'ttnn' takes dtype float32 (exact, for checking) or bfloat16 / auto (the device's "
                         f"formats: bf16 activations, bfloat8_b MLP weights), got {dtype!r}")
    why = "fp32 everywhere" if chosen == torch.float32 else "bf16 activations, bfloat8_b MLP weights"
    return chosen, f"dtype {dtype} -> {why} (ttnn)"


def load_hook(dtype: torch.dtype, device: torch.device) -> LoadHook | None:
    """None: tensors are read in fp32 or bf16 and converted in `build`."""
    return None


def build(config: Pi0Config, state: dict[str, torch.Tensor], device: str | torch.device) -> Pi0TTNN:
    """The TTNN model over the canonical tensors (consumed as they are converted), on the card `device` names
    ("auto" or "tt"; "cpu" emulates on the host)."""
    refuse_fast(config, "ttnn")
    return Pi0TTNN(config, state, open_runtime(device))
