"""Offline, bitsandbytes' "could not fetch the optional CPU kernel from the Hub" warning is dropped, and only it."""

import logging
import os
import subprocess
import sys
import textwrap

from lrzoo.offline_notices import LOGGER, NOTICE, OfflineHubKernelNotice


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(LOGGER, logging.WARNING, __file__, 1, message, None, None)


def test_the_filter_drops_the_hub_kernel_notice_and_nothing_else():
    notice = OfflineHubKernelNotice()
    assert not notice.filter(_record(NOTICE + ": No module named 'kernels'. Please make sure ..."))
    assert notice.filter(_record("int8 matmul overflowed"))


def test_importing_lrzoo_offline_installs_it_before_peft(tmp_path):
    code = textwrap.dedent(f"""
        import logging
        import lrzoo
        logger = logging.getLogger({LOGGER!r})
        logger.warning({NOTICE!r} + ": No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
    """)
    for offline, shown in (("1", False), ("0", True)):
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "PYTHONPATH": ""}
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300, check=True)
        assert "another bitsandbytes warning" in result.stderr
        assert (NOTICE in result.stderr) == shown, result.stderr
