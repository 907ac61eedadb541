"""Large-image restoration as a user runs it: peak memory and megapixels per second of
``python -m experiments.restore`` with its defaults, and tiled against whole-image throughput.

Two measurements per network:

- **end to end**: a generated image is written to a temporary folder and restored by a fresh
  ``python -m experiments.restore`` process with no tiling or memory flags, so the command
  picks the whole image or tiles from its default memory budget exactly as for a user. The peak
  resident set size is the kernel's count for that child process (``os.wait4``), so it covers
  everything the command holds at once: the runtime, the weights, the compilations, the input,
  the output and the PNG encoder. Megapixels per second are output pixels over the wall time of
  the command (start-up and compilation included) and over the command's own restore time (the
  line it prints after writing the image; compilation of the tile shape included).
- **tiled against whole**: in this process, the same network restores one image whole and in
  tiles of ``tile`` input pixels (default overlap); the median of several runs after a warm-up
  of each. Throughput is counted in output pixels, so the work the overlap repeats counts
  against the tiles; the share of repeated pixels is reported beside the ratio.

The generated images are smooth random fields with fine noise added (deterministic per size),
gray for the gray denoiser and RGB otherwise; Converse-USRNet gets a Gaussian blur kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cases as C
from benchmarks.timing import measure

# Input size (width, height) per network for the end-to-end run: x4 SR restores 1000x750 into a
# 4000x3000 photo; the others, which run every layer at the output size, get a size that takes a few
# minutes on a 2-core CPU (their rate is reported per megapixel, so it carries over to larger images).
LARGE_INPUT = {
    "full": {"srresnet": (1000, 750), "dncnn": (1000, 750), "conversenet": (640, 480), "usrnet": (640, 480)},
    "quick": {"srresnet": (40, 30), "dncnn": (64, 48), "conversenet": (40, 30), "usrnet": (40, 30)},
}
TILED_VS_WHOLE = {"full": {"image": 992, "tile": 512}, "quick": {"image": 56, "tile": 32}}
RSS_LIMIT_GIB = {"srresnet": 3.0}  # the bound on the x4 SR case
TIMEOUT_S = 3600.0
_RESTORE_S = re.compile(r"->.*\((\d+(?:\.\d+)?) s\)\s*$")
_HOW = re.compile(r"\): (whole image|tiles of \d+ px, overlap \d+)")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (W, H); ValueError naming the flag otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 8:
        raise ValueError(f"--large-size: expected WIDTHxHEIGHT with both at least 8 (e.g. 1000x750), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def test_image(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 (height, width, channels) image: a smooth random field plus fine noise."""
    rng = np.random.default_rng([seed, width, height, channels])
    coarse = rng.random((height // 32 + 2, width // 32 + 2, channels))
    # bilinear upsampling of the coarse grid, separable
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bot = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    img = (top * (1 - fy) + bot * fy) * 200 + 28 + rng.normal(0, 8, (height, width, channels))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _inputs(net: str, width: int, height: int, folder: Path) -> list[str]:
    """Write the input image (and kernel) for ``net``; return the restore flags that name them."""
    from converse_jax.imageio import write_image

    cin = C.NET_IO[net][0]
    src = folder / "input.png"
    write_image(src, test_image(width, height, cin))
    flags = [f"--input={src}"]
    if net == "usrnet":
        np.save(folder / "kernel.npy", C.blur_kernels(1)[0])
        flags.append(f"--kernel={folder / 'kernel.npy'}")
    return flags


def _wait_with_rusage(proc: subprocess.Popen) -> tuple[int, int]:
    """Wait for ``proc``; return (exit code, its peak RSS in bytes) from the kernel's accounting."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, usage.ru_maxrss * scale


def run_end_to_end(net: str, width: int, height: int, *, log: Callable[[str], None] = print,
                   env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Restore a generated ``width`` x ``height`` input with ``python -m experiments.restore`` and its
    defaults in a child process; its peak RSS, wall time and megapixels per second."""
    if not hasattr(os, "wait4"):
        return {"error": "peak RSS of a child process needs os.wait4 (Linux or macOS)"}
    scale = C.NET_IO[net][2]
    out_mp = width * scale * height * scale / 1e6
    with tempfile.TemporaryDirectory(prefix="converse_large_") as tmp:
        folder = Path(tmp)
        cmd = [sys.executable, "-m", "experiments.restore", f"--model={net}", *_inputs(net, width, height, folder),
               f"--output={folder / 'output.png'}", "--no-progress"]
        lines: list[str] = []
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=_collect, args=(proc, lines, log, net), daemon=True)
        reader.start()
        rc, peak = _wait_or_kill(proc, reader, t0, timeout, log, net)
        wall = time.monotonic() - t0
        reader.join(timeout=5)
    res: dict[str, Any] = {"net": net, "input": [width, height], "output": [width * scale, height * scale],
                           "output_mp": out_mp, "wall_s": wall, "peak_rss_bytes": peak, "exit_code": rc}
    if rc != 0:
        res["error"] = f"restore exited with {rc}: {(lines or ['(no output)'])[-1][:200]}"
        return res
    restore_s = next((float(m.group(1)) for ln in lines if (m := _RESTORE_S.search(ln))), None)
    how = next((m.group(1) for ln in lines if (m := _HOW.search(ln))), "?")
    res.update(how=how, restore_s=restore_s, mp_per_s_wall=out_mp / wall,
               s_per_mp_wall=wall / out_mp)
    if restore_s:
        res.update(mp_per_s_restore=out_mp / restore_s, s_per_mp_restore=restore_s / out_mp)
    if net in RSS_LIMIT_GIB:
        res["rss_limit_bytes"] = RSS_LIMIT_GIB[net] * 2**30
        res["within_limit"] = peak <= res["rss_limit_bytes"]
    return res


def _collect(proc: subprocess.Popen, lines: list[str], log: Callable[[str], None], net: str) -> None:
    """Forward the child's output lines to ``log`` (so progress shows) and keep them."""
    assert proc.stdout is not None
    for ln in proc.stdout:
        ln = ln.rstrip()
        if ln:
            lines.append(ln)
            log(f"  restore {net}: {ln}")


def _wait_or_kill(proc: subprocess.Popen, reader: threading.Thread, t0: float, timeout: float,
                  log: Callable[[str], None], net: str) -> tuple[int, int]:
    """Wait for the child with a heartbeat every 30 s; kill it (only it) after ``timeout`` seconds."""
    result: dict[str, tuple[int, int]] = {}
    waiter = threading.Thread(target=lambda: result.setdefault("r", _wait_with_rusage(proc)), daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(timeout=30)
        elapsed = time.monotonic() - t0
        if waiter.is_alive():
            if elapsed > timeout:
                proc.kill()
                waiter.join()
                return -9, result.get("r", (-9, 0))[1]
            log(f"  restore {net}: running, {elapsed:.0f} s")
    return result["r"]


def tiled_vs_whole(net: str, image: int, tile: int, policy: dict[str, Any],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Output megapixels per second restoring one ``image`` x ``image`` input whole and in tiles of
    ``tile`` (this process; median after warm-up), and their ratio."""
    from converse_jax import evaluation as E
    from converse_jax.tiling import plan_tiles

    model, spec = E.load_model(net)
    img = test_image(image, image, int(spec.in_channels))
    kernel = C.blur_kernels(1)[0] if spec.task.takes_kernel else None
    scale = int(spec.scale)
    out_mp = (image * scale) ** 2 / 1e6
    plan = plan_tiles(image, image, tile, E.DEFAULT_OVERLAP, spec.task.tile_context)
    res: dict[str, Any] = {"net": net, "image": image, "tile": tile, "overlap": E.DEFAULT_OVERLAP,
                           "tiles": plan.count, "processed_over_image": plan.count * tile * tile / image**2}
    for name, t in (("whole", 0), ("tiled", tile)):
        log(f"  tiled vs whole {net} {image}x{image}: {name}")
        r = E.make_restorer(model, spec, t)
        timing = measure(lambda r=r: E.restore_array(r, spec, img, kernel=kernel), **policy)
        res[name] = dict(timing, mp_per_s=out_mp / timing["median_s"])
    res["ratio"] = res["tiled"]["mp_per_s"] / res["whole"]["mp_per_s"]
    return res


def run(nets: list[str], quick: bool, policy: dict[str, Any], size: tuple[int, int] | None = None,
        env: dict[str, str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The section: end-to-end runs for ``nets`` (one at a time), then tiled against whole for the
    first of them."""
    sizes = LARGE_INPUT["quick" if quick else "full"]
    out: dict[str, Any] = {"runs": [], "tiled_vs_whole": None}
    for net in nets:
        w, h = size or sizes[net]
        log(f"large restore {net}: {w}x{h} input, experiments.restore defaults")
        out["runs"].append(run_end_to_end(net, w, h, log=log, env=env))
        log(format_lines({"runs": out["runs"][-1:]})[-1].strip())
    tv = TILED_VS_WHOLE["quick" if quick else "full"]
    try:
        out["tiled_vs_whole"] = tiled_vs_whole(nets[0], tv["image"], tv["tile"], policy, log)
    except Exception as e:  # noqa: BLE001 - reported in the section, not fatal
        out["tiled_vs_whole"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def format_lines(sec: dict[str, Any]) -> list[str]:
    """Plain-text lines of the section for the report."""
    if not sec:
        return []
    lines = ["", "large restore (python -m experiments.restore, defaults; peak RSS of the process):"]
    for r in sec.get("runs", []):
        (w, h), (ow, oh) = r["input"], r["output"]
        head = f"  {r['net']:<12} {w}x{h} -> {ow}x{oh}"
        if "error" in r:
            lines.append(f"{head}: {r['error']}")
            continue
        lim = ""
        if "within_limit" in r:
            lim = f" (limit {r['rss_limit_bytes'] / 2**30:.0f} GiB: {'ok' if r['within_limit'] else 'EXCEEDED'})"
        rest = (f", restore {r['restore_s']:.0f} s = {r['mp_per_s_restore']:.3g} MP/s"
                f" ({r['s_per_mp_restore']:.1f} s/MP)") if r.get("restore_s") else ""
        lines.append(f"{head}: {r['how']}; peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{lim}; "
                     f"wall {r['wall_s']:.0f} s = {r['mp_per_s_wall']:.3g} MP/s{rest}")
    tv = sec.get("tiled_vs_whole")
    if tv and "error" in tv:
        lines.append(f"  tiled vs whole: {tv['error']}")
    elif tv:
        lines.append(f"  tiled vs whole, {tv['net']} {tv['image']}x{tv['image']}, tiles of {tv['tile']} "
                     f"(overlap {tv['overlap']}, {tv['tiles']} tiles, {tv['processed_over_image']:.2f}x the pixels): "
                     f"whole {tv['whole']['mp_per_s']:.3g} MP/s, tiled {tv['tiled']['mp_per_s']:.3g} MP/s, "
                     f"ratio {tv['ratio']:.2f} (median of {tv['tiled']['runs']})")
    return lines
