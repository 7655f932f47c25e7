"""Where the real benchmark annotation files are: ../shared/data beside the checkout (as CI lays it)."""

from pathlib import Path

_CANDIDATES = [Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")]
SHARED_DATA = next((path for path in _CANDIDATES if path.is_dir()), _CANDIDATES[0])
