"""Where the real benchmark annotation files are: ../shared/data beside the checkout (as CI lays it), or
the folder GEMVG_SHARED_DATA names."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("GEMVG_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
