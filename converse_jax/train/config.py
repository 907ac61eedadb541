"""Training configuration: one :class:`TrainConfig` per run, its defaults taken from a model's
:class:`~converse_jax.models.TrainRecipe`, saved as JSON in the run's working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converse_jax.degradations import parse_level_range
from converse_jax.models import get_spec, list_models
from converse_jax.nn.precision import PRECISIONS
from converse_jax.train.errors import IncompatibleWorkdirError, TrainConfigError

__all__ = [
    "TrainConfig",
    "config_from_spec",
    "parse_range",
    "parse_int_list",
    "parse_model_kwargs",
    "check_compatible",
    "CONFIG_FILE",
]

CONFIG_FILE = "config.json"

# Fields that change the shapes or meaning of the saved state: a workdir trained with other
# values cannot be resumed.
_STATE_FIELDS = ("model", "model_kwargs")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``workdir`` None means ``./runs/<model>``.

    Noise ranges (``sigma``, ``blur_noise``) are on the 0..255 scale. ``batch_size`` is the
    global batch (split over every device of every host). ``lr`` is multiplied by ``lr_decay``
    at each step of ``lr_milestones``. ``precision``: ``"float32"`` or ``"bf16"`` (mixed precision,
    :mod:`converse_jax.nn.precision`); parameters, gradients, loss and optimizer state are float32
    either way, so a run may change it when it resumes.
    """

    model: str
    steps: int
    batch_size: int
    patch_size: int
    lr: float
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.5
    loss: str = "l1"
    sigma: tuple[float, float] = (25.0, 25.0)
    blur_noise: tuple[float, float] = (0.0, 2.55)
    scale: int = 1
    seed: int = 0
    data: str = "embedded"
    val_data: str | None = None
    val_count: int = 8
    val_size: int = 96
    workdir: str | None = None
    eval_every: int = 2000
    save_every: int = 2000
    log_every: int = 10
    keep: int = 3
    num_workers: int = 0
    init_from: str | None = None
    precision: str = "float32"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def resolved_workdir(self) -> Path:
        """The working directory as an absolute path."""
        return Path(self.workdir if self.workdir else Path("runs") / self.model).expanduser().absolute()

    def validate(self) -> TrainConfig:
        """Check every field; a bad one raises :class:`TrainConfigError` naming the flag."""
        if self.model not in list_models():
            raise TrainConfigError(f"unknown model {self.model!r}: choose one of {', '.join(list_models())}")
        for name, minimum in (("steps", 1), ("batch_size", 1), ("patch_size", 1), ("eval_every", 1),
                              ("save_every", 1), ("log_every", 1), ("keep", 1), ("num_workers", 0),
                              ("val_count", 1), ("val_size", 1), ("seed", 0), ("scale", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainConfigError(f"--{_flag(name)} must be an integer >= {minimum}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"--lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise TrainConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if any((not isinstance(m, int)) or m < 1 for m in self.lr_milestones) or \
                list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise TrainConfigError(f"--lr-milestones must be increasing positive steps, got {self.lr_milestones!r}")
        if self.loss not in ("l1", "l2"):
            raise TrainConfigError(f"--loss must be l1 or l2, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("sigma", "blur_noise"):
            parse_range(getattr(self, name), name)
        if self.scale > 1 and self.patch_size % self.scale:
            raise TrainConfigError(f"--patch-size ({self.patch_size}) must be a multiple of the x{self.scale} "
                                   f"scale of {self.model}")
        if not isinstance(self.model_kwargs, Mapping):
            raise TrainConfigError(f"--arch must be key=value pairs, got {self.model_kwargs!r}")
        return self

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        return json.loads(json.dumps(out))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json` (unknown keys are ignored, missing ones take defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("lr_milestones", "sigma", "blur_noise"):
            if key in kw and kw[key] is not None:
                kw[key] = tuple(kw[key])
        if "model_kwargs" in kw:
            kw["model_kwargs"] = dict(kw["model_kwargs"] or {})
        return cls(**kw)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_from_spec(name: str, **overrides: Any) -> TrainConfig:
    """The default configuration of model ``name``: its registry recipe (the practice of docs/training.md,
    see the recipe's ``source``) plus ``overrides``."""
    spec = get_spec(name)
    r = spec.recipe
    cfg = TrainConfig(
        model=name, steps=r.steps, batch_size=r.batch_size, patch_size=r.patch_size, lr=r.lr,
        lr_milestones=tuple(r.lr_milestones), loss=r.loss, sigma=tuple(r.sigma), blur_noise=tuple(r.blur_noise),
        scale=spec.scale, source=r.source)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def parse_range(text: str | float | Sequence[float], name: str = "sigma") -> tuple[float, float]:
    """``"25"`` -> ``(25, 25)``; ``"0,50"`` -> ``(0, 50)`` (0..255 scale): the command line's
    :func:`~converse_jax.degradations.parse_level_range`, its errors naming the flag."""
    try:
        return parse_level_range(text, f"--{_flag(name)}")
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None


def parse_int_list(text: str, name: str = "lr_milestones") -> tuple[int, ...]:
    """``"100000,150000"`` -> ``(100000, 150000)``; ``""`` or ``"none"`` -> ``()``."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise TrainConfigError(f"--{_flag(name)} must be comma-separated integers or 'none', got {text!r}") from None
    return values


def parse_model_kwargs(text: str) -> dict[str, Any]:
    """``"features=8,num_blocks=1"`` -> ``{"features": 8, "num_blocks": 1}`` (ints, floats, strings)."""
    out: dict[str, Any] = {}
    text = text.strip()
    if not text:
        return out
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier() or not value:
            raise TrainConfigError(f"--arch must look like 'features=8,num_blocks=1', got {text!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def check_compatible(saved: Mapping[str, Any], config: TrainConfig, workdir: Path) -> list[str]:
    """Compare a workdir's saved config with ``config``.

    Returns the names of fields that differ but allow resuming; raises
    :class:`IncompatibleWorkdirError` when the saved state cannot belong to ``config``.
    """
    new = config.to_json()
    for key in _STATE_FIELDS:
        old_value = saved.get(key, {} if key == "model_kwargs" else None)
        if old_value != new[key]:
            what = "model" if key == "model" else "architecture (--arch)"
            raise IncompatibleWorkdirError(
                f"{workdir} holds a run of {saved.get('model')!r} with {what} {old_value!r}, not {new[key]!r}: "
                f"choose another --workdir (or resume it with the same --model/--arch)")
    ignore = {"workdir", "init_from", "source"}
    return sorted(k for k in new if k not in ignore and k in saved and saved[k] != new[k])
