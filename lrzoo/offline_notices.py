"""Silences third-party notices that are always true here and say nothing about the run.

* bitsandbytes (imported by PEFT and transformers whenever it is installed) tries ``kernels.get_kernel``
  from the Hugging Face Hub at import on AVX512-BF16 CPUs and logs a warning when that fails; it falls back
  to its own CPU code either way. With ``HF_HUB_OFFLINE=1`` it fails by design, and online it fails when
  the ``kernels`` package cannot verify the publisher (nothing a user of lrzoo can change), so in both
  cases the line is dropped. Online with ``kernels`` missing it is left alone: there it means
  ``pip install kernels``.
* ``kernels`` itself logs "Skipping publisher trust check ... because Hugging Face Hub is in offline mode"
  on that same attempt: dropped offline.
* transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated, which PEFT's ``PeftModel``
  triggers on every ``lrzoo.wrap`` (PEFT's code, not the user's, reads the old name).

Imported first by ``lrzoo/__init__``, before PEFT.
"""

import logging
import os
import warnings

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
LOGGER = "bitsandbytes.backends.cpu.ops"
#: the reason in bitsandbytes' notice when ``kernels`` refuses an unverified publisher
TRUST_REASON = "could not verify publisher trust status"
TRUST_NOTICE = "Skipping publisher trust check"
TRUST_LOGGER = "kernels._internals.hf_hub"


class OfflineHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' "could not fetch the optional CPU kernel from the Hub" warning (offline: always; online:
    when the Hub's publisher check refused it)."""

    def __init__(self, offline: bool = True):
        super().__init__()
        self.offline = offline

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(NOTICE):
            return True
        return not (self.offline or TRUST_REASON in record.getMessage())


class OfflineTrustNotice(logging.Filter):
    """Drops ``kernels``' "Skipping publisher trust check ... offline mode" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TRUST_NOTICE)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


logging.getLogger(LOGGER).addFilter(OfflineHubKernelNotice(offline=hub_offline()))
if hub_offline():
    logging.getLogger(TRUST_LOGGER).addFilter(OfflineTrustNotice())
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
