"""Silences one third-party notice that is always true offline and says nothing about the run.

bitsandbytes (imported by PEFT and transformers whenever it is installed) tries ``kernels.get_kernel``
from the Hugging Face Hub at import on AVX512-BF16 CPUs and logs a warning when that fails. With
``HF_HUB_OFFLINE=1`` it fails by design, so the line led every lrzoo-train, lrzoo-sweep and lrzoo-bench
log; bitsandbytes falls back to its own CPU code either way. Online, the notice is left alone (there it
can mean a missing ``pip install kernels``). Imported first by ``lrzoo/__init__``, before PEFT.
"""

import logging
import os

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
LOGGER = "bitsandbytes.backends.cpu.ops"


class OfflineHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' "could not fetch the optional CPU kernel from the Hub" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOTICE)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


if hub_offline():
    logging.getLogger(LOGGER).addFilter(OfflineHubKernelNotice())
