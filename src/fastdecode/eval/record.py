"""The JSON record of one perplexity run: configuration, environment, result, and where the
per-token NLL went."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import atomic

RECORD_KIND = "fastdecode.ppl"
RECORD_VERSION = 1
_REPO_ROOT = Path(__file__).resolve().parents[3]


def git_info(root: Path = _REPO_ROOT) -> dict:
    """Commit and dirtiness of the checkout this package runs from ({} outside one);
    $FASTDECODE_GIT_COMMIT wins (a device copy of the tree may carry a stale .git)."""
    if os.environ.get("FASTDECODE_GIT_COMMIT"):
        return {"commit": os.environ["FASTDECODE_GIT_COMMIT"], "dirty": None,
                "commit_source": "FASTDECODE_GIT_COMMIT"}
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(),
                "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment(device: torch.device | str | None = None) -> dict:
    """Versions and hardware that the numbers depend on."""
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("fastdecode", "transformers"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env["device"] = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
    env["git"] = git_info()
    return env


def build_record(*, result, config: dict, data: dict, env: dict, per_token: dict | None,
                 segment: int, diagnosis: dict | None = None) -> dict:
    """One run's record (see ``docs/ppl.md`` for the fields)."""
    return {
        "kind": RECORD_KIND, "version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**config, "eval": result.spec.to_dict(), "label": result.spec.label},
        "data": data, "environment": env,
        "result": {
            "ppl": result.ppl, "mean_nll": result.mean_nll, "tokens_scored": result.n,
            "seconds": round(result.seconds, 3),
            "tokens_per_s": round(result.n / result.seconds, 2) if result.seconds else None,
            "max_kv_len": int(result.kv_len.max()),
            "segments": {"size": segment, "ppl": result.segment_ppl(segment)},
            **({"info": result.info} if result.info else {}),
        },
        "per_token": per_token, "diagnosis": diagnosis,
    }


def write_json(obj: dict, path: str | Path) -> Path:
    """Write the record atomically; NaN is refused, not written as invalid JSON."""
    return atomic.write_json(path, obj, what="record", allow_nan=False)
