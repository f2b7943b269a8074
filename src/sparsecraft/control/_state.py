"""A :class:`~sparsecraft.control.TargetSparsity`'s checkpoint: what it holds and how it is checked.

:func:`check_state` validates every field with the constructor's rules
before anything is assigned, so a bad checkpoint leaves the controller as it
was (all or nothing).
"""

from __future__ import annotations

import math
from typing import Any

from ._ramp import _RAMPS

_KEYS = {"step", "log_scale", "last_error", "gain_now", "trend", "measured", "target_now", "saturated",
         "base_scales", "config"}
# Added with min_density; a checkpoint written before has none of them (defaults: no caps).
# "average": the running average since the freeze (TargetSparsity(average=True)).
_OPTIONAL = {"term_caps", "term_offsets", "average"}
_CONFIG = {"target", "start_step", "end_step", "initial", "measure", "every", "gain", "drift", "ramp"}
# Added later (a checkpoint written before has none of them): min_density; hold and freeze_step;
# average; fine_tune_scale.
_CONFIG_OPTIONAL = {"min_density", "hold", "freeze_step", "average", "fine_tune_scale"}
_MEASURES = ("elements", "groups")


def fraction_open(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"Expected {name} in (0, 1) (a fraction of zeros). Received: {name}={value!r}")
    return float(value)


def fraction_from_zero(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"Expected {name} in [0, 1). Received: {name}={value!r}")
    return float(value)


def integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected an int {name} >= {minimum}. Received: {name}={value!r}")
    return value


def finite(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in [low, high], else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"Expected a finite {name} in [{low}, {high}]. Received: {name}={value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"Expected {name} as a finite number > 0. Received: {name}={value!r}")
    return float(value)


def check_state(state: Any, n_terms: int, measure: str, ramp_is_callable: bool) -> dict[str, Any]:
    """The checked, converted fields of a ``TargetSparsity.state_dict()``.

    Raises:
        ValueError: a missing or unknown key, a field outside what the constructor
            accepts (``target=7``, ``every=0``, ``log_scale=nan``, ...), another
            ``measure``, or a state for another number of terms.
    """
    if not isinstance(state, dict) or not _KEYS <= set(state) <= _KEYS | _OPTIONAL:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"Expected a TargetSparsity state_dict with keys {sorted(_KEYS)}. Received: {got}")
    cfg = state["config"]
    if not isinstance(cfg, dict) or set(cfg) - _CONFIG_OPTIONAL != _CONFIG:
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"Expected a config with keys {sorted(_CONFIG)}. Received: {got}")
    out: dict[str, Any] = {
        "target": fraction_open("target", cfg["target"]),
        "start_step": integer("start_step", cfg["start_step"], 0),
        "end_step": integer("end_step", cfg["end_step"], 0),
        "initial": fraction_from_zero("initial", cfg["initial"]),
        "every": integer("every", cfg["every"], 1),
        "gain": finite("gain", cfg["gain"], 0.0),
        "drift": finite("drift", cfg["drift"], 0.0),
    }
    if out["gain"] == 0:
        raise ValueError("Expected gain > 0. Received: gain=0")
    if out["end_step"] <= out["start_step"]:
        raise ValueError(f"Expected end_step > start_step. Received: start_step={out['start_step']}, "
                         f"end_step={out['end_step']}")
    if cfg["measure"] != measure:
        raise ValueError(f"Expected a state with measure={measure!r} (this controller's). Received: "
                         f"measure={cfg['measure']!r}")
    ramp = cfg["ramp"]
    if ramp == "callable":
        if not ramp_is_callable:
            raise ValueError("Expected a named ramp (the state was saved with a callable one). Received: "
                             "ramp='callable'; build the controller with that callable")
    elif ramp not in _RAMPS:
        raise ValueError(f"Expected ramp in {_RAMPS} or 'callable'. Received: ramp={ramp!r}")
    else:
        out["ramp"] = ramp
    if "min_density" in cfg:
        out["min_density"] = fraction_from_zero("min_density", cfg["min_density"])
    if "hold" in cfg:
        if cfg["hold"] not in ("freeze", "track"):
            raise ValueError(f"Expected hold in ('freeze', 'track'). Received: hold={cfg['hold']!r}")
        out["hold"] = cfg["hold"]
    if "freeze_step" in cfg:
        out["freeze_step"] = integer("freeze_step", cfg["freeze_step"], out["end_step"])
    if "average" in cfg:
        if not isinstance(cfg["average"], bool):
            raise ValueError(f"Expected average to be a bool. Received: average={cfg['average']!r}")
        if cfg["average"] and out.get("hold", "freeze") != "freeze":
            raise ValueError(f"Expected hold='freeze' with average=True. Received: hold={out['hold']!r}")
        out["average"] = cfg["average"]
    if "fine_tune_scale" in cfg:
        scale = positive("fine_tune_scale", cfg["fine_tune_scale"])
        if scale != 1 and out.get("hold", "freeze") != "freeze":
            raise ValueError(f"Expected hold='freeze' with fine_tune_scale={scale!r}. Received: hold={out['hold']!r}")
        out["fine_tune_scale"] = scale
    out["step"] = integer("step", state["step"], 0)
    out["log_scale"] = finite("log_scale", state["log_scale"])
    out["last_error"] = finite("last_error", state["last_error"], -1.0, 1.0)
    out["gain_now"] = finite("gain_now", state["gain_now"], 0.0)
    out["trend"] = finite("trend", state["trend"], -0.5, 0.5)
    measured = state["measured"]
    out["measured"] = None if measured is None else finite("measured", measured, 0.0, 1.0)
    out["target_now"] = finite("target_now", state["target_now"], 0.0, 1.0)
    if not isinstance(state["saturated"], bool):
        raise ValueError(f"Expected saturated to be a bool. Received: saturated={state['saturated']!r}")
    out["saturated"] = state["saturated"]
    out["base_scales"] = _floats("base_scales", state["base_scales"], n_terms, 0.0)
    caps = state.get("term_caps", [None] * n_terms)
    out["term_caps"] = _floats("term_caps", caps, n_terms, allow_none=True)
    out["term_offsets"] = _floats("term_offsets", state.get("term_offsets", [0.0] * n_terms), n_terms,
                                  high=0.0)
    return out


def _floats(name: str, values: Any, n: int, low: float = -math.inf, high: float = math.inf,
            allow_none: bool = False) -> list[Any]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"Expected a state_dict for {n} controlled terms ({name}: {n} values). "
                         f"Received: {got}")
    return [None if v is None and allow_none else finite(f"{name}[{i}]", v, low, high)
            for i, v in enumerate(values)]


class ControllerState:
    """Checkpoints of :class:`~sparsecraft.control.TargetSparsity` (a base class).

    It reads and writes the settings and the memory (``_step``, ``_log_scale``,
    ``_gain``, ...) that :class:`TargetSparsity` keeps, then calls its ``_apply_scale``.
    """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, multiplier, controller memory and settings."""
        return {
            "step": self._step,
            "log_scale": self._log_scale,
            "last_error": self._last_error,
            "gain_now": self._gain,
            "trend": self._drift,
            "measured": self._measured,
            "target_now": self._target_now,
            "saturated": self._saturated,
            "base_scales": list(self._base_scales),
            "term_caps": list(self._term_caps),
            "term_offsets": list(self._term_offsets),
            "config": {"target": self.target, "start_step": self.start_step, "end_step": self.end_step,
                       "initial": self.initial, "measure": self.measure, "every": self.every,
                       "gain": self.gain, "drift": self.drift, "min_density": self.min_density,
                       "hold": self.hold, "freeze_step": self.freeze_step, "average": self.average,
                       "fine_tune_scale": self.fine_tune_scale,
                       "ramp": self.ramp if isinstance(self.ramp, str) else "callable"},
            **({"average": self._average.state()} if self._average is not None else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the controlled terms get their scales back.

        Every field is checked with the constructor's rules first; then all are
        loaded, or none (the controller is unchanged when it raises).

        Raises:
            ValueError: missing or unknown keys, a value the constructor would refuse
                (``target=7``, ``every=0``, ``log_scale=nan``, ...), another
                ``measure``, or a state for another number of terms.
        """
        new = check_state(state_dict, len(self.terms), self.measure, callable(self.ramp))
        average = None
        if new.get("average", self.average) and new.get("hold", self.hold) == "freeze":
            if self._optimizer is None:
                raise ValueError("Expected a state with average=False for a controller on a Regularizer. "
                                 "Received: average=True")
            from ._average import IterateAverage  # here: _average imports this module's checks

            average = IterateAverage(self._trained())
            average.load(state_dict.get("average", {"count": 0, "values": []}))  # checked before any change
        self.target, self.start_step, self.end_step = new["target"], new["start_step"], new["end_step"]
        self.initial, self.every = new["initial"], new["every"]
        self.gain, self.drift = new["gain"], new["drift"]
        self.min_density = new.get("min_density", self.min_density)
        self.hold = new.get("hold", self.hold)
        self.freeze_step = new.get("freeze_step", self.freeze_step)
        self.fine_tune_scale = new.get("fine_tune_scale", self.fine_tune_scale)
        if "ramp" in new:
            self.ramp = new["ramp"]
        self._step = new["step"]
        self._log_scale = new["log_scale"]
        self._last_error = new["last_error"]
        self._gain = new["gain_now"]
        self._drift = new["trend"]
        self._measured = new["measured"]
        self._target_now = new["target_now"]
        self._saturated = new["saturated"]
        self._base_scales = new["base_scales"]
        self._term_caps = new["term_caps"]
        self._term_offsets = new["term_offsets"]
        self.average, self._average = average is not None, average
        self._apply_scale()
