"""Every rank of a distributed run must see the one run directory rank 0 writes.

On several machines a relative or node-local ``output_root`` gives each node its own folder, and a resume would
then restart the other nodes from step 0 beside a resumed rank 0 (a hang, or weights that differ per rank).
The run directory's files and its lock are :mod:`lrzoo.runs`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any


class RunDirNotShared(RuntimeError):
    """The ranks of one distributed run do not see the same run directory."""


def check_shared(run_dir: str, rank: int, world: int) -> None:
    """Raise :class:`RunDirNotShared` on every rank unless all ``world`` ranks see the one ``run_dir``: rank 0
    writes a token file there, each rank reads it back (a collective: every rank calls it, in a process group)."""
    import secrets as _secrets

    import torch.distributed as dist

    probe = [f".ranks.tmp-{_secrets.token_hex(4)}", _secrets.token_hex(8)]   # a leftover if killed: cleared
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, probe[0]), "w") as handle:
            handle.write(probe[1])
    dist.broadcast_object_list(probe, src=0)  # rank 0's file name and token, after it has written them
    try:  # in this rank's own run_dir: a relative output_root resolves per node
        with open(os.path.join(run_dir, probe[0])) as handle:
            seen = handle.read() == probe[1]
    except OSError:
        seen = False
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (seen, socket.gethostname(), os.getcwd()))
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, probe[0]))
    blind = [(r, host, cwd) for r, (ok, host, cwd) in enumerate(views) if not ok]
    if blind:
        shown = "; ".join(f"rank {r} on {host} (working directory {cwd})" for r, host, cwd in blind)
        raise RunDirNotShared(
            f"{os.path.abspath(run_dir)} is not one directory for all {world} ranks: {shown} cannot see what rank 0 "
            f"on {views[0][1]} writes there. Every node of a run must write to the same folder: set output_root to "
            "an absolute path on a filesystem all nodes mount (a relative one is resolved in each node's working "
            "directory).")
