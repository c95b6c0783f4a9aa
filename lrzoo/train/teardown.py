"""How a rank of a distributed job ends: leave the process group, then exit without interpreter finalization.

A gloo rank that exits the ordinary way can abort *after* a run that succeeded: "terminate called without an
active exception" (SIGABRT), the launcher kills the other ranks, and the job exits non-zero. Destroying the
process group first was not enough: objects that still reference the C++ process group (a device mesh, a
pending ``Work``) can keep it and its worker threads alive into the interpreter's teardown of module globals and
static objects, where a thread still joinable calls ``std::terminate`` (pytorch#179291 describes the race; torch
2.13 has no fix). It is rare and timing-dependent: lrzoo's CI saw it in two FSDP tests of one run, after
``destroy_process_group``; 44 repeats of one of them on the 2-core VM, 3 at a time, did not.

So a rank that held a process group runs what an ordinary exit runs while the interpreter is whole (the
``atexit`` handlers, the logging handlers, the stdio buffers) and then leaves with :func:`os._exit`, which skips
the finalization where the abort happens. A single process never calls this.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn, Union


def in_process_group() -> bool:
    """Whether this process joined a ``torch.distributed`` process group (torchrun / accelerate launch)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave_process_group() -> None:
    """Destroy the process group, if any, while the interpreter is whole."""
    import torch.distributed as dist

    if in_process_group():
        dist.destroy_process_group()


def exit_status(code: Union[int, str, None]) -> int:
    """The status ``sys.exit(code)`` would give: ``None`` is 0, a message is printed and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_rank(code: Union[int, str, None] = 0) -> NoReturn:
    """Leave the process group and end this rank with ``code``, skipping interpreter finalization.

    Everything an ordinary exit does before finalization still happens, in the same order: ``atexit``
    handlers (which is where libraries flush and close their files), then logging, then stdout/stderr."""
    status = exit_status(code)
    leave_process_group()
    atexit._run_exitfuncs()  # what Py_Finalize runs first; os._exit would skip it
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(status)
