"""lrzoo's console entry points (``lrzoo-train``, ``lrzoo-sweep``, ``lrzoo-report``, ``lrzoo-bench``, ...)."""
