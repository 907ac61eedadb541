"""Multi-process training: two processes on this machine joined by ``jax.distributed`` (CPU
collectives over gloo), two simulated CPU devices each, train like one process with four devices,
stop together when only one of them is signalled, and resume together from their shared checkpoint.

The processes run ``python -m experiments.train`` as a user would on two hosts, with a free local
port for the coordinator; every run has a time limit, and a failure shows what each process wrote.
The two processes compile the same programs side by side; gloo (the CPU collectives) fails a run where
one of them reaches a new collective some 30 s after the other, far more than their usual difference.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from converse_jax.train.parallel import any_process, setup_distributed
from experiments.train import main as train_main

# load_converted reads the arrays back to the host without a sharding: intended here
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 300.0  # seconds for one run of the pair (start-up, compilation, a few steps, checkpoints)
# what a platform without cross-process CPU collectives answers (then the test is skipped, saying so)
NO_CPU_COLLECTIVES = ("Multiprocess computations aren't implemented on the CPU backend",
                      "make_gloo_tcp_collectives", "gloo collectives are not", "Gloo is not available")
PORT_TAKEN = ("address already in use", "Address in use", "Failed to add port")
# variables that would make jax.distributed.initialize detect another cluster than the two processes
_CLUSTER_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM_PROCESSES",
                         "JAX_LOCAL_DEVICE_IDS", "TPU_", "CLOUD_TPU")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One compilation cache for this module's runs (not the user's): a restart reuses the programs."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _env(devices: int, cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(_CLUSTER_ENV_PREFIXES)}
    env.update(JAX_PLATFORMS="cpu", CONVERSE_JAX_COMPILE_CACHE=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(workdir: Path, steps: int) -> list[str]:
    """A tiny Converse-DnCNN, global batch 4 (one sample per device), a loss record every step."""
    flags = {"model": "dncnn", "arch": "features=4,num_blocks=1", "steps": steps, "batch-size": 4,
             "patch-size": 16, "save-every": 2, "eval-every": 1000000, "log-every": 1, "val-count": 1,
             "val-size": 16, "workdir": workdir}
    return [f"--{k}={v}" for k, v in flags.items()] + ["--no-progress"]


@dataclass
class _Proc:
    """One training process, its output going to files (no pipe to fill up)."""

    name: str
    popen: subprocess.Popen
    out: Path
    err: Path

    def text(self) -> tuple[str, str]:
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def report(self) -> str:
        out, err = self.text()
        return (f"--- {self.name}: exit status {self.popen.poll()}\n--- stdout (end):\n{out[-3000:]}\n"
                f"--- stderr (end):\n{err[-6000:]}")


_STARTED: list[_Proc] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """Whatever happens in a test, no training process outlives it."""
    yield
    _kill(_STARTED)
    _STARTED.clear()


def _start(name: str, args: list[str], env: dict[str, str], logs: Path) -> _Proc:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        popen = subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                                 stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    _STARTED.append(_Proc(name, popen, out, err))
    return _STARTED[-1]


def _start_pair(flags: list[str], cache: str, logs: Path, port: int) -> list[_Proc]:
    common = ["--multihost", f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2"]
    return [_start(f"process{i}", [*flags, *common, f"--process-id={i}"], _env(2, cache), logs) for i in range(2)]


def _kill(procs: list[_Proc]) -> None:
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait(timeout=30)


def _fail(procs: list[_Proc], what: str) -> None:
    _kill(procs)
    text = "\n".join(p.report() for p in procs)
    for marker in NO_CPU_COLLECTIVES:
        if marker in text:
            pytest.skip(f"this platform's JAX cannot run cross-process CPU collectives ({marker!r})")
    pytest.fail(f"{what}\n{text}", pytrace=False)


def _wait(procs: list[_Proc], expected: int, what: str, until=None, timeout: float = RUN_TIMEOUT) -> None:
    """Wait until every process has exited with ``expected`` or, with ``until``, until ``until()``
    holds while all still run. A process that ends otherwise ends the others (they would wait for it
    in their next collective) and fails the test with what each process wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.popen.poll() for p in procs]
        if until is not None:
            if until():
                return
            bad = any(c is not None for c in codes)
        else:
            if all(c == expected for c in codes):
                return
            bad = any(c is not None and c != expected for c in codes)
        if bad:
            time.sleep(2.0)  # let the other process write its part of the story
            _fail(procs, f"{what}: exit statuses {[p.popen.poll() for p in procs]} (expected {expected})")
        time.sleep(0.05)
    _fail(procs, f"{what}: still running after {timeout:.0f} s")


def _run_pair(flags: list[str], cache: str, logs: Path, what: str) -> list[_Proc]:
    """Both processes to completion (status 0); a coordinator port taken meanwhile is retried once."""
    for attempt in range(2):
        procs = _start_pair(flags, cache, logs / f"try{attempt}", _free_port())
        try:
            _wait(procs, 0, what)
            return procs
        except pytest.fail.Exception:
            if attempt or not any(m in "".join(p.text()[1] for p in procs) for m in PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _steps_logged(workdir: Path) -> int:
    """Loss records in metrics.jsonl so far (read while it is written: a line being written is not counted)."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


def _losses(workdir: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for rec in _records(workdir):
        if "loss" in rec:
            assert rec["step"] not in losses, f"step {rec['step']} logged twice in {workdir / 'metrics.jsonl'}"
            losses[rec["step"]] = rec["loss"]
    return losses


def _checkpoints(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _params(checkpoint: Path) -> dict:
    from converse_jax.weights import load_converted

    return load_converted(checkpoint)[0]


@pytest.mark.slow
def test_two_processes_train_like_one_with_four_devices_and_resume_together(tmp_path, cache_dir):
    mp, ref = tmp_path / "two_processes", tmp_path / "one_process"
    # 1. two processes, two devices each; SIGTERM to process 1 only, after a few steps: both stop after
    #    the same step, save it together and exit with 130
    procs = _start_pair(_flags(mp, 100000), cache_dir, tmp_path / "logs1", _free_port())
    _wait(procs, 130, "first run", until=lambda: _steps_logged(mp) >= 3)
    procs[1].popen.send_signal(signal.SIGTERM)
    _wait(procs, 130, "first run, stopping after SIGTERM to process 1", timeout=120)
    out0 = procs[0].text()[0]
    assert "global batch 4 over 4 cpu device(s) x 2 host(s)" in out0, procs[0].report()
    stopped = max(_checkpoints(mp))
    assert f"a signal to another process received: stopped after step {stopped}, checkpoint saved" in out0
    assert sorted(_losses(mp)) == list(range(1, stopped + 1))
    # 2. both restarted with a later end: they resume from the shared checkpoint
    total = stopped + 2
    procs = _run_pair(_flags(mp, total), cache_dir, tmp_path / "logs2", "restart")
    assert f"resumed from {mp / 'checkpoints' / str(stopped)}" in procs[0].text()[0], procs[0].report()
    assert "checkpoint:" not in procs[1].text()[0]  # the summary is process 0's
    # 3. one process with four devices, uninterrupted
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *_flags(ref, total)], cwd=REPO,
                          env=_env(4, cache_dir), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the same losses at every step (float32 sums over devices may be ordered differently), each step
    # logged once although two processes wrote to the workdir, and the same weights at the end
    got, want = _losses(mp), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, total + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-6)
    assert len(set(want.values())) == total  # the losses move: the comparison is between different steps
    val = [[r["val_psnr"] for r in _records(w) if "val_psnr" in r] for w in (mp, ref)]
    assert len(val[0]) == len(val[1]) == 1
    np.testing.assert_allclose(val[0], val[1], rtol=1e-5)
    a, b = _params(mp / "checkpoints" / str(total)), _params(ref / "checkpoints" / str(total))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=str(key))


@pytest.mark.parametrize("argv, names", [
    (["--multihost", "--num-processes=2", "--process-id=2"], ("--process-id", "0..1")),
    (["--num-processes=2", "--process-id=-1"], ("--process-id",)),  # the options alone imply --multihost
    (["--multihost", "--num-processes=0"], ("--num-processes", "at least 1")),
    (["--coordinator-address=localhost", "--num-processes=2", "--process-id=0"], ("--coordinator-address",
                                                                                  "HOST:PORT")),
])
def test_bad_multiprocess_options_are_one_line_errors(argv, names, tmp_path, capsys):
    code = train_main(["--model=dncnn", f"--workdir={tmp_path / 'w'}", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, err
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_single_process_helpers():
    assert setup_distributed(False) is False
    assert any_process(True) is True and any_process(False) is False
