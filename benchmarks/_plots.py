"""matplotlib, when installed (the ``bench`` extra), drawing off-screen to PNG files."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["COLORS", "pyplot", "save", "unavailable"]

#: One colour per backend variant family, the same in every plot.
COLORS = {
    "raw": "#7f7f7f",
    "etcd-v3 async": "#1f77b4",
    "etcd-v3": "#1f77b4",
    "etcd-v3 shim": "#17becf",
    "etcd-v3 watch": "#2ca02c",
    "etcd-v2": "#ff7f0e",
    "c10d": "#d62728",
    "native": "#9467bd",
}


def unavailable() -> str | None:
    """Why no plot can be drawn, or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (`pip install -e '.[bench]'`, which `make bench` does)"
    return None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    # No timestamp in the file: a re-run with equal numbers makes an equal file.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    pyplot().close(figure)
    return path
