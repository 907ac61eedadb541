"""Runs the benchmark sections, pairs each JAX figure with the PyTorch baseline's, and writes
the report (JSON and a plain-text table)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import cases as C
from benchmarks.timing import DEFAULT_POLICY, QUICK_POLICY, cpu_info, cpu_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCH_ENV_VAR = "CONVERSE_TORCH_PYTHON"


class BenchmarkError(RuntimeError):
    """A failure the command line reports as one line."""


# ----------------------------------------------------------------------------- subprocesses

def _subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def _run_json(cmd: list[str], env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Run a worker command; return its last stdout line parsed as JSON, or {"error": ...}."""
    try:
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {r.returncode}: {tail}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"unreadable worker output: {lines[-1][:200]}"}


def find_torch_python(explicit: str | None) -> tuple[str | None, str]:
    """The interpreter that runs the baseline: ``--torch-python``, else ``$CONVERSE_TORCH_PYTHON``,
    else this one if it can import torch. Returns (path or None, why)."""
    for source, path in (("--torch-python", explicit), (TORCH_ENV_VAR, os.environ.get(TORCH_ENV_VAR))):
        if path:
            if not Path(path).exists():
                raise BenchmarkError(f"{source}: interpreter {path} not found; give the python of an "
                                     "environment with torch (pip install torch), or pass --no-torch")
            return path, source
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return sys.executable, "this interpreter"
    return None, (f"torch is not installed here: install the 'bench' extra, or point --torch-python "
                  f"(or ${TORCH_ENV_VAR}) at a python that has torch; or pass --no-torch")


class TorchBaseline:
    """Runs baseline measurements in fresh processes of a torch-enabled interpreter."""

    def __init__(self, python: str, timeout: float | None, reference: Path | None = None):
        self.python = python
        self.timeout = timeout
        self.reference = reference  # a checkout of the official code (benchmarks.official), or None
        self.official_info: dict[str, Any] = {}
        # A shared CPU makes OpenMP's spinning barriers very slow; sleeping waits give torch its
        # best numbers here. A value set by the user wins.
        self.env = _subprocess_env({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
        self.info: dict[str, Any] = {}
        self.device = "cpu"  # "cuda" when the JAX side runs on a GPU

    def run(self, section: str, case: dict[str, Any], policy: dict[str, Any], official: bool = False) -> dict[str, Any]:
        """One measurement of our baseline, or with ``official`` of the official code in ``self.reference``."""
        req: dict[str, Any] = {"section": section, "case": case, "policy": policy, "device": self.device}
        if official:
            if self.reference is None:
                return {}
            req["reference"] = str(self.reference)
        out = _run_json([self.python, "-m", "benchmarks.torch_worker", json.dumps(req)], self.env, self.timeout)
        if "env" in out:
            env = dict(out.pop("env"), OMP_WAIT_POLICY=self.env["OMP_WAIT_POLICY"], python=self.python)
            if official:
                self.official_info.setdefault("weights", {})
                if "weights" in env:
                    self.official_info["weights"][case.get("net", "?")] = env.pop("weights")
                self.official_info.update(env)
            else:
                self.info = env
        return out


def jax_subprocess(section: str, case: dict[str, Any], policy: dict[str, Any],
                   timeout: float | None) -> dict[str, Any]:
    """One JAX measurement in a fresh process of this interpreter (used for peak memory)."""
    req = json.dumps({"section": section, "case": case, "policy": policy})
    out = _run_json([sys.executable, "-m", "benchmarks.jax_bench", req], _subprocess_env(), timeout)
    out.pop("env", None)
    return out


# ----------------------------------------------------------------------------- report rows

def _row(section: str, name: str, mode: str, shape: str, unit: str, ours: dict | None, torch: dict | None,
         impl: str = "ours", note: str = "", official: dict | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"section": section, "name": name, "mode": mode, "shape": shape, "impl": impl,
                           "unit": unit, "ours": ours, "torch": torch, "official": official}
    if ours and official and "median_s" in ours and "median_s" in official:
        row["speedup_official"] = official["median_s"] / ours["median_s"]
    if ours and torch and "median_s" in ours and "median_s" in torch:
        row["speedup"] = torch["median_s"] / ours["median_s"]
        target = C.TARGETS.get((section, mode if section == "op" else None))
        if target is not None and impl == "ours":
            row["target"] = target
            row["meets_target"] = row["speedup"] >= target
    if note:
        row["note"] = note
    return row


def _op_shape(c: dict[str, Any]) -> str:
    return (f"B{c['B']} C{c['C']} {c['H']}x{c['W']} k{c['k']} s{c['scale']} "
            f"{c['padding_mode']} {c['padding']}")


def _net_shape(c: dict[str, Any]) -> str:
    s = f"B{c['batch']} {c['in_hw']}x{c['in_hw']}x{c['cin']}"
    s += f" -> {c['out_hw']}x{c['out_hw']}" if c["scale"] != 1 else ""
    return s + ("".join(f" {k[4:]}={v}" for k, v in c["arch"].items()) if c.get("arch") else "")


def _error(out: dict[str, Any] | None) -> str:
    return out.get("error", "") if out else ""


# ----------------------------------------------------------------------------- sections

def run_suite(*, sections: list[str], quick: bool, torch: TorchBaseline | None, torch_note: str,
              torch_memory: bool = False, alt: bool = False, nets: list[str] | None = None,
              policy: dict[str, Any] | None = None, large_size: tuple[int, int] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the requested sections and return the report (a JSON-ready dict). ``large_size``: the
    input (width, height) of the ``large`` section instead of each network's default."""
    from benchmarks import jax_bench as J

    policy = dict(policy or (QUICK_POLICY if quick else DEFAULT_POLICY))
    report = _new_report(sections, quick, nets, alt, policy, torch_note, J.environment())
    if torch is not None:
        # the baseline runs on the same kind of device as JAX
        torch.device = "cuda" if report["meta"]["jax"]["backend"] in ("gpu", "cuda", "rocm") else "cpu"
    if "op" in sections:
        _op_section(report, quick, torch, policy, log)
    for section in ("infer", "train"):
        if section in sections:
            _net_section(report, section, quick, torch, policy, alt, nets, log)
    if "memory" in sections:
        report["memory"] = _memory_section(quick, torch if torch_memory else None, policy, log)
    if "micro" in sections:
        from benchmarks import micro

        log("micro: component timings")
        report["micro"] = micro.run(quick=quick, policy=policy, log=log)
    if "large" in sections:
        from benchmarks import restore_large

        report["large"] = restore_large.run(nets or list(C.NETWORKS), quick, policy, large_size,
                                            env=_subprocess_env(), log=log)
    report["meta"]["torch"] = torch.info if torch else None
    report["meta"]["official"] = (dict(torch.official_info, path=str(torch.reference))
                                  if torch and torch.reference else None)
    report["meta"]["load_average_end"] = _loadavg()
    return report


def _new_report(sections: list[str], quick: bool, nets: list[str] | None, alt: bool, policy: dict[str, Any],
                torch_note: str, jax_env: dict[str, Any]) -> dict[str, Any]:
    """An empty report with its ``meta`` block filled in. ``precision``: the compute precision of the
    networks the JAX side builds (the process default, which ``--precision`` sets and the worker
    processes inherit through ``$CONVERSE_JAX_PRECISION``); the PyTorch baselines run in float32."""
    from converse_jax.nn.precision import get_default_precision

    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick, "precision": get_default_precision(), "sections": sections,
        "nets": nets or list(C.NETWORKS), "alt": alt,
        "policy": policy, "platform": platform.platform(), "cpu": cpu_info(),
        "python": platform.python_version(), "jax": jax_env,
        "load_average_start": _loadavg(), "torch": None, "torch_note": torch_note,
    }
    return {"meta": meta, "results": [], "memory": {}, "micro": [], "notes": []}


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"error": ...}``: a failing measurement is reported in its row, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def _op_section(report: dict[str, Any], quick: bool, torch: TorchBaseline | None, policy: dict[str, Any],
                log: Callable[[str], None]) -> None:
    """The operator's rows: every implementation of ``jax_bench.op_impls`` against the baseline."""
    from benchmarks import jax_bench as J

    impls, notes = J.op_impls()
    report["notes"] += [f"op: {v}" for v in notes.values()]
    for case in C.op_cases(quick):
        log(f"op {case['name']}: {_op_shape(case)}")
        base = torch.run("op", case, policy) if torch else {}
        off = torch.run("op", case, policy, official=True) if torch else {}
        for impl_name, impl in impls.items():
            ours = _guarded(lambda impl=impl, case=case: J.run_op(case, policy, impl))
            for mode in ("fwd", "fwd+bwd"):
                note = _error(ours) or _error(base) or (f"official: {_error(off)}" if _error(off) else "")
                report["results"].append(_row("op", case["name"], mode, _op_shape(case), "s", ours.get(mode),
                                              base.get(mode), impl=impl_name, note=note, official=off.get(mode)))


def _net_section(report: dict[str, Any], section: str, quick: bool, torch: TorchBaseline | None,
                 policy: dict[str, Any], alt: bool, nets: list[str] | None, log: Callable[[str], None]) -> None:
    """The rows of ``section`` (``infer`` or ``train``) for each network case."""
    from benchmarks import jax_bench as J

    cases, unit = (C.infer_cases(quick), "img/s") if section == "infer" else (C.train_cases(quick), "steps/s")
    run = J.run_infer if section == "infer" else J.run_train
    models_missing = J.models_available()
    for case in cases:
        if nets is not None and case["net"] not in nets:
            continue
        log(f"{section} {case['net']}: {_net_shape(case)}")
        results = {}
        for impl in J.NET_IMPLS if alt else J.NET_IMPLS[:1]:
            results[impl] = ({"error": models_missing} if models_missing
                             else _guarded(lambda impl=impl, case=case: run(case, policy, impl)))
        base = torch.run(section, case, policy) if torch else {}
        off = torch.run(section, case, policy, official=True) if torch else {}
        for impl, ours in results.items():
            note = _error(ours) or _error(base) or (f"official: {_error(off)}" if _error(off) else "")
            report["results"].append(_row(section, case["net"], section, _net_shape(case), unit, ours.get(section),
                                          base.get(section), impl=impl, note=note, official=off.get(section)))


def _memory_section(quick: bool, torch: TorchBaseline | None, policy: dict[str, Any],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Peak memory of Converse-DnCNN inference: XLA's compiled buffers, then runs in fresh processes
    (the baseline's too when ``torch`` is given)."""
    from benchmarks import jax_bench as J

    mem: dict[str, Any] = {"runs": [], "compiled": []}
    models_missing = J.models_available()
    if models_missing:
        mem["error"] = models_missing
        return mem
    for n in C.MEMORY_COMPILE_SIZES["quick" if quick else "full"]:
        log(f"memory (compiled) dncnn {n}x{n}")
        case = C.memory_case(n, quick)
        mem["compiled"].append(dict(_guarded(lambda case=case: J.compiled_memory(case)), size=n))
    for case in C.memory_cases(quick):
        n = case["out_hw"]
        log(f"memory (run) dncnn {n}x{n}")
        ours = jax_subprocess("memory", case, policy, None)
        entry: dict[str, Any] = {"size": n, "ours": ours.get("memory", ours)}
        if torch is not None:
            out = torch.run("memory", case, policy)
            entry["torch"] = out.get("memory", out)
        mem["runs"].append(entry)
    mem["linearity"] = _linearity(mem)
    return mem


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _linearity(mem: dict[str, Any]) -> dict[str, Any]:
    """Bytes per output pixel at each size; memory is linear in area when these agree."""
    out: dict[str, Any] = {}
    comp = [m for m in mem["compiled"] if m.get("available")]
    if len(comp) >= 2:
        per = {m["size"]: m["peak_bytes"] / m["pixels"] for m in comp}
        out["compiled_bytes_per_pixel"] = per
        out["compiled_spread"] = max(per.values()) / min(per.values())
    runs = [r["ours"] for r in mem["runs"] if "pixels" in r.get("ours", {})]
    key = "peak_bytes" if runs and "peak_bytes" in runs[0] else "peak_rss_growth_bytes"
    if len(runs) >= 2 and all(key in r for r in runs):
        per = {r["pixels"]: r[key] / r["pixels"] for r in runs}
        out["run_bytes_per_pixel"] = per
    return out


# ----------------------------------------------------------------------------- output

def _fmt_time(r: dict[str, Any] | None, unit: str) -> str:
    if not r or "median_s" not in r:
        return "-"
    t = r["median_s"]
    if unit == "s":
        return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s"
    return f"{1.0 / t:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """A readable plain-text summary of the report."""
    lines = _header_lines(report["meta"]) + _result_lines(report["results"])
    lines += _memory_lines(report.get("memory") or {})
    if report.get("large"):
        from benchmarks import restore_large

        lines += restore_large.format_lines(report["large"])
    if report.get("micro"):
        lines += ["", "components (JAX, median):"]
        for m in report["micro"]:
            lines.append(f"  {m['name']:<58} {_fmt_time(m, 's'):>11}" + (f"  {m['note']}" if m.get("note") else ""))
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _header_lines(meta: dict[str, Any]) -> list[str]:
    """Date, backend, precision, baseline and load average."""
    j = meta["jax"]
    lines = [f"converse_jax benchmark  {meta['date']}  {'QUICK ' if meta['quick'] else ''}"
             f"backend={j['backend']} devices={j['device_count']} ({j['device_kind']}) "
             f"cpu_threads={j['cpu_threads']} jax={j['jax_version']}",
             f"precision: {meta.get('precision', 'float32')} (the JAX networks; the PyTorch baselines run float32)"]
    if meta.get("cpu"):
        lines.insert(1, f"cpu: {cpu_summary(meta['cpu'])}")
    t = meta.get("torch")
    lines.append(f"baseline: torch {t['torch_version']} on {t.get('device', 'cpu')} threads={t['torch_threads']} "
                 f"OMP_WAIT_POLICY={t['OMP_WAIT_POLICY']}" if t else f"baseline: none ({meta.get('torch_note')})")
    o = meta.get("official")
    if o:
        weights = ", ".join(f"{k}: {v}" for k, v in (o.get("weights") or {}).items()) or "none loaded"
        lines.append(f"official: {o['path']} (torch {o.get('torch_version', '?')}, threads "
                     f"{o.get('torch_threads', '?')}; weights {weights})")
    lines.append(f"load average: start {meta.get('load_average_start')} end {meta.get('load_average_end')}"
                 "  (median of runs after warm-up)")
    return lines


def _result_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table of timed rows (op, infer, train) with ratios and targets; with the official code's
    column and our ratio against it when it was timed."""
    off = any(r.get("official") is not None for r in rows)
    header = f"{'section':<7} {'case':<12} {'mode':<8} {'impl':<8} {'shape':<38} {'ours':>11} {'torch':>11} " \
             f"{'ratio':>7}" + (f" {'official':>11} {'ratio':>7}" if off else "") + "  target"
    lines = ["", header, "-" * len(header)] if rows else []
    for r in rows:
        unit = r["unit"]
        ratio = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        tgt = ""
        if "target" in r:
            tgt = f">={r['target']:.0f}x {'ok' if r['meets_target'] else 'MISSED'}"
        extra = ""
        if off:
            r_off = f"{r['speedup_official']:.1f}x" if "speedup_official" in r else "-"
            extra = f" {_fmt_time(r.get('official'), unit):>11} {r_off:>7}"
        lines.append(f"{r['section']:<7} {r['name']:<12} {r['mode']:<8} {r['impl']:<8} {r['shape']:<38} "
                     f"{_fmt_time(r['ours'], unit):>11} {_fmt_time(r['torch'], unit):>11} {ratio:>7}{extra}  {tgt}"
                     + (f"  [{r['note']}]" if r.get("note") else ""))
    if rows:
        lines.append("(op: median time per call; infer: images/s; train: steps/s; ratio: how many times faster "
                     "ours is than torch" + (" / than the official code" if off else "") + ")")
    return lines


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    """Peak memory: XLA's compiled buffers per size, the measured runs, and how linear in area they are."""
    if not mem:
        return []
    lines = ["", "peak memory, Converse-DnCNN inference (B1, gray):"]
    if "error" in mem:
        lines.append(f"  {mem['error']}")
    for m in mem.get("compiled", []):
        if m.get("available"):
            lines.append(f"  {m['size']:>5}^2 XLA buffers {m['peak_bytes'] / 2**20:9.1f} MiB "
                         f"({m['peak_bytes'] / m['pixels']:.0f} B/px; temp {m['temp_bytes'] / 2**20:.1f} MiB, "
                         f"compile {m['compile_s']:.1f} s)")
        else:
            lines.append(f"  {m['size']:>5}^2 XLA buffers: {m.get('error', 'not reported by this backend')}")
    lines += [_memory_run_line(r) for r in mem.get("runs", [])]
    lin = mem.get("linearity", {})
    if "compiled_spread" in lin:
        lines.append(f"  bytes/pixel spread across sizes (XLA buffers): {lin['compiled_spread']:.2f}x "
                     "(1.00x = exactly linear in area)")
    return lines


def _memory_run_line(r: dict[str, Any]) -> str:
    """One measured memory run (ours, and the baseline's when measured)."""
    o = r["ours"]
    if "error" in o:
        return f"  {r['size']:>5}^2 run: {o['error']}"
    val = o.get("peak_bytes", o.get("peak_rss_growth_bytes", 0))
    s = f"  {r['size']:>5}^2 run: {val / 2**20:9.1f} MiB ({o['method']}, {o['seconds']:.2f} s)"
    if "torch" in r:
        tr = r["torch"]
        tval = tr.get("peak_bytes", tr.get("peak_rss_growth_bytes"))
        s += (f"; torch {tval / 2**20:.1f} MiB ({tr['seconds']:.1f} s)" if tval is not None
              else f"; torch: {tr.get('error')}")
    return s


def write_json_atomic(report: dict[str, Any], path: Path) -> None:
    """Write the report to ``path`` atomically (see :func:`converse_jax.fileio.write_json_atomic`)."""
    from converse_jax.fileio import write_json_atomic as _write
    _write(path, report)
