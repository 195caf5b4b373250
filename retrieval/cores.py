"""The CPU cores this process may use: one answer for the encoders' threads, FAISS, the decoder pool and query texts.

Imports only the standard library, so the CLI can read it for its defaults.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
