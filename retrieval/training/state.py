"""The resumable training state: what a run needs to continue exactly where its last checkpoint left it."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import TrainingError

STATE_FILE = "train_state.pt"
STATE_FORMAT = "clipsearch-train-state"
STATE_VERSION = 1


def rng_states() -> dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA), as tensors and plain values.

    Plain types only, so the state file loads with `torch.load(weights_only=True)`.
    """
    numpy_state = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "gauss": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    key = numpy_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(state: dict[str, Any], out_dir: Path) -> Path:
    """Write the training state atomically: a temporary file renamed over the old one.

    A run killed while writing leaves the previous state intact.
    """
    path = out_dir / STATE_FILE
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{STATE_FILE}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state(out_dir: Path) -> dict[str, Any] | None:
    """The saved training state of `out_dir`, or None when it has none.

    Raises:
        TrainingError: the file exists but is not a training state this version can resume.
    """
    path = out_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise TrainingError(f"{path}: cannot read the training state ({e}); delete it to start the run over") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise TrainingError(
            f"{path}: not a clipsearch training state of version {STATE_VERSION}; delete it to start over"
        )
    return state
