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
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# the libraries whose versions change the numbers (or how they were computed)
LIBRARIES = ("torch", "transformers", "lightning", "peft", "torchmetrics", "tokenizers", "datasets",
             "numpy", "scipy", "hydra-core", "omegaconf", "safetensors")


def environment(device=None) -> dict[str, Any]:
    """Versions, git commit and the knobs that change CPU float results (thread count).
    ``device``: the torch device that runs (None: not known yet, see ``device_info``)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env: dict[str, Any] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    env["torch"] = torch.__version__  # the build actually imported (+cpu / +cu...)
    env.update(device_info(device))
    env["torch_threads"] = torch.get_num_threads()  # float summation order on CPU depends on it
    env["cuda"] = torch.version.cuda
    env.update(_git(Path(__file__).resolve().parents[2]))
    return env


def device_info(device=None) -> dict[str, Any]:
    """``accelerator`` (cpu, cuda, mps: the device type that ran) and ``device`` (the card's
    name, or the CPU's). ``device=None``: both null, filled in once the trainer has chosen."""
    import torch

    if device is None:
        return {"accelerator": None, "device": None}
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"accelerator": device.type, "device": name}


def _git(repo: Path) -> dict[str, Any]:
    """The commit, and whether the tree had uncommitted changes (then the commit alone
    does not reproduce the run)."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        if len(head) != 40:
            return {"git_commit": None, "git_dirty": None}
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5).stdout
        return {"git_commit": head, "git_dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
