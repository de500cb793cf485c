"""GPU perf suite fixtures: the machine info recorded with every benchmark run, the models,
the budgets, the copy bandwidth measured once per session, and the summary of which budgets
applied with what margin (printed at the end of the run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def pytest_benchmark_update_commit_info(config, commit_info):
    """A tree copied to a benchmark machine may carry a stale .git: the commit it was sent
    at comes in $FASTDECODE_GIT_COMMIT (scripts/gpu_bench.sh sets it)."""
    if os.environ.get("FASTDECODE_GIT_COMMIT"):
        commit_info["id"] = os.environ["FASTDECODE_GIT_COMMIT"]
        commit_info["dirty"] = None
        commit_info["source"] = "FASTDECODE_GIT_COMMIT"


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastdecode.bench.history import gpu_class

    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        machine_info.update(gpu=name, gpu_class=gpu_class(name), cuda=torch.version.cuda,
                            gpu_count=torch.cuda.device_count())
        try:
            import subprocess

            machine_info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # the driver version is informative only
            machine_info["driver"] = "unknown"
    try:
        import transformers

        machine_info["transformers"] = transformers.__version__
    except ImportError:
        pass


@pytest.fixture(scope="session")
def gpu() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fastdecode.bench.history import gpu_class

    return gpu_class(torch.cuda.get_device_name())


@pytest.fixture(scope="session")
def budgets(gpu) -> dict:
    """The whole budgets file (fastdecode.bench.budgets picks what applies to the class)."""
    from fastdecode.bench.budgets import load_budgets

    return load_budgets(ROOT / "perf" / "budgets.toml")


@pytest.fixture(scope="session")
def copy_gbps(gpu) -> float:
    """The device's copy bandwidth, measured once in this session: the efficiency budgets'
    floor (fastdecode.bench.roofline)."""
    from fastdecode.bench.roofline import device_bandwidth

    bw = device_bandwidth("cuda")
    torch.cuda.empty_cache()
    return bw["copy_gbps"]


BUDGET_LINES = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[BUDGET_LINES] = []


@pytest.fixture(scope="session")
def budget_lines(request) -> list:
    """Lines for the end-of-run summary: per configuration, each budget applied."""
    return request.config.stash[BUDGET_LINES]


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(BUDGET_LINES, [])
    if lines:
        terminalreporter.section("perf budgets applied (fastdecode.bench.budgets)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ppl_model():
    """SmolLM2-135M on the GPU for the perplexity half of each configuration, or None when
    it is not installed (FASTDECODE_PERF_PPL_MODEL names another path, e.g. a .gguf)."""
    from fastdecode.errors import FastdecodeError
    from fastdecode.models import load_model

    name = os.environ.get("FASTDECODE_PERF_PPL_MODEL", "smollm2-135m")
    try:
        return load_model(name, dtype=torch.bfloat16, device="cuda")
    except FastdecodeError as e:
        pytest.fail(f"perplexity model {name!r} unavailable: {e}")
