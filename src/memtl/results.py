"""``results.json``: the one file every run leaves behind; reports and notebooks read only it."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def write_results(output_dir: str | os.PathLike | None, results: dict[str, Any]) -> Path | None:
    """Atomic write (tmp file + rename): a crash mid-write never leaves half a file.
    ``output_dir=None`` (a non-zero DDP rank) writes nothing."""
    if output_dir is None:
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def environment() -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        repo = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        env["git_commit"] = out if len(out) == 40 else None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
