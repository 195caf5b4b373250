"""The robustness benchmark on a smaller corpus: hostile files through `clipsearch index` in a subprocess under
a memory limit, with no hang, bounded memory, and every file stored as Pillow decodes it or failed with a reason."""

from __future__ import annotations

import subprocess
import sys

from benchmarks import robustness


def test_hostile_files_end_stored_failed_or_skipped_within_the_bounds(tmp_path):
    # A 2 MP limit keeps the bombs small; the thin images are as thin as in the full run.
    result = robustness.run(tmp_path, flips=1, max_megapixels=2.0, large=(3000, 500), timeout=300.0)

    assert result["violations"] == []
    assert result["peak_rss_mb"] < result["rss_bound_mb"]
    kinds = result["kinds"]
    assert result["files"] == sum(kinds.values()) and min(kinds.values()) > 0, kinds
    assert result["indexed"] >= kinds["good"]  # every intact file, and the damaged files Pillow decodes
    assert result["failed"] >= kinds["fail"]
    assert result["unsupported"] == kinds["unsupported"] and result["skipped"] == kinds["skip"]
    assert result["failed_although_pillow_decodes"] == 0
    assert "corrupt or truncated image data" in result["reasons"]


def test_help_and_the_summary_line_a_machine_can_parse():
    done = subprocess.run([sys.executable, robustness.__file__, "--help"], capture_output=True, text=True, check=True)
    assert "--max-megapixels" in done.stdout and "--flips" in done.stdout
    line = robustness.summary_line({"files": 3, "indexed": 1, "failed": 1, "unsupported": 0, "skipped": 1,
                                    "violations": [], "peak_rss_mb": 12.5, "seconds": 1.25})  # fmt: skip
    assert dict(field.split("=") for field in line.removeprefix("robustness: ").split()) == {
        "files": "3", "stored": "1", "failed": "1", "unsupported": "0", "skipped": "1", "violations": "0",
        "peak_rss_mb": "12.5", "seconds": "1.25",
    }  # fmt: skip
    assert "\n" not in line
