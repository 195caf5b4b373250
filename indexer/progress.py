"""The indexer's progress bar: a tqdm that gives a rate and a time left only once they mean something."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


class Progress(tqdm):
    """A tqdm bar whose rate and time left appear once `settle` files are done, averaged over the whole run.

    The first files arrive while the decoder workers start and before the first encoder batch, so a rate taken
    then predicts a run many times longer (or shorter) than it is; and files arrive in bursts (decoding pauses
    while a batch is encoded), so a moving average swings with every batch. Hence no estimate while settling,
    then the average since the start (tqdm's smoothing=0).
    """

    _SETTLING_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?{postfix}]"

    def __init__(self, *args: Any, settle: int = 0, **kwargs: Any) -> None:
        self.settle = settle
        super().__init__(*args, smoothing=0, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's, with the settling format until `settle` files are done."""
        info = super().format_dict
        if self.n < self.settle:
            info["bar_format"] = self._SETTLING_FORMAT
        return info
