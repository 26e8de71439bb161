"""Sweeps as data: the sweep files and their settings.

A sweep is a YAML file in ``experiments/sweeps/`` (files starting with ``_`` are shared settings,
not sweeps)::

    name: quant
    description: ...
    settings: {eval_tokens: 16384}         # overrides _defaults.yaml "full" for this sweep
    points:                                # explicit method specs (see experiments.methods.compress)
      - {method: dense}
    grid:                                  # each entry: cartesian product of its lists
      - {method: [rtn, gptq], bits: [3, 4], group_size: [64, -1]}
    quick:                                 # the --quick subset: its own points and settings
      settings: {eval_tokens: 2048}
      points: [...]

Settings (``_defaults.yaml``, sections ``full`` and ``quick``, overridden per sweep): ``seqlen``
(evaluation window), ``eval_tokens`` (evaluation budget), ``eval2_windows`` (windows of ``seqlen``
tokens on the second evaluation text; 0 = none), ``calib_samples`` and ``calib_seqlen`` (calibration
windows), ``seed``. The runner is :mod:`experiments.run.sweep`.

Settings added after the reference tables were committed (:data:`ADDED_SETTINGS`) stay out of a
point's id (``experiments.run.sweep.point_id``), so the committed rows keep their ids and a resumed
run does not measure them twice; their value is a context column instead
(``experiments.core.runs.SWEEP_CONTEXT_ADDED``).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from experiments.core.runs import PLAIN_NAME_RULE, is_plain_name
from experiments.methods.spec import MethodSpec, parse_spec

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SETTING_KEYS = ("seqlen", "eval_tokens", "calib_samples", "calib_seqlen", "seed", "eval2_windows")
ADDED_SETTINGS = ("eval2_windows",)
# Settings that may be 0: the seed, and a budget whose 0 means "not measured".
_ZERO_OK = ("seed", "eval2_windows")


@dataclass
class Sweep:
    name: str
    description: str
    full_points: list[MethodSpec]
    quick_points: list[MethodSpec]
    full_settings: dict[str, int]
    quick_settings: dict[str, int]
    path: Path

    def points(self, quick: bool) -> list[MethodSpec]:
        return self.quick_points if quick else self.full_points

    def settings(self, quick: bool) -> dict[str, int]:
        return self.quick_settings if quick else self.full_settings


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"sweep file {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"sweep file {path}: expected a mapping at the top level")
    return data


def merge_settings(base: Mapping[str, Any], override: Mapping[str, Any] | None, where: str) -> dict[str, int]:
    out = dict(base)
    for k, v in (override or {}).items():
        if k not in SETTING_KEYS:
            raise ValueError(f"{where}: unknown setting {k!r}; settings are {', '.join(SETTING_KEYS)}")
        out[k] = v
    out.setdefault("eval2_windows", 0)   # an older _defaults.yaml of a user's own: no second text
    for k in SETTING_KEYS:
        v = out.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in _ZERO_OK else 1):
            raise ValueError(f"{where}: setting {k}={v!r} must be a {'non-negative' if k in _ZERO_OK else 'positive'} "
                             f"integer")
    if out["eval_tokens"] < out["seqlen"]:
        raise ValueError(f"{where}: setting eval_tokens={out['eval_tokens']} is smaller than seqlen={out['seqlen']}, "
                         f"so no evaluation window fits; use eval_tokens >= {out['seqlen']} (a multiple of seqlen)")
    return out


def _expand(section: Mapping[str, Any], where: str) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for i, p in enumerate(section.get("points") or []):
        specs.append(parse_spec(p, where=f"{where} points[{i}]"))
    for i, g in enumerate(section.get("grid") or []):
        if not isinstance(g, Mapping):
            raise ValueError(f"{where} grid[{i}]: expected a mapping of option -> list of values")
        keys = list(g)
        values = [v if isinstance(v, list) else [v] for v in g.values()]
        for combo in itertools.product(*values):
            specs.append(parse_spec(dict(zip(keys, combo)), where=f"{where} grid[{i}]"))
    seen: dict[str, int] = {}
    unique = []
    for s in specs:
        key = json.dumps(s.to_dict(), sort_keys=True)
        if key not in seen:
            seen[key] = 1
            unique.append(s)
    return unique


def load_sweep(path: str | Path, defaults: Mapping[str, Any] | None = None) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {str(path)!r} does not exist")
    if defaults is None:
        defaults = load_yaml(SWEEPS_DIR / "_defaults.yaml")
    data = load_yaml(path)
    known = {"name", "description", "settings", "points", "grid", "quick"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    name = data.get("name", path.stem)
    if not is_plain_name(name):
        raise ValueError(f"sweep file {path}: name {name!r}{'' if 'name' in data else ' (from the file name)'} must "
                         f"be a plain name ({PLAIN_NAME_RULE}), e.g. `name: my-sweep`: it names the table "
                         f"sweep_<name>.csv in the run directory")
    quick = data.get("quick") or {}
    full_settings = merge_settings(defaults.get("full", {}), data.get("settings"), f"{path.name} settings")
    quick_settings = merge_settings(defaults.get("quick", {}), quick.get("settings"), f"{path.name} quick.settings")
    full_points = _expand(data, f"{path.name}")
    quick_points = _expand(quick, f"{path.name} quick")
    if not full_points:
        raise ValueError(f"sweep file {path}: no points (give `points:` and/or `grid:`)")
    return Sweep(name=name, description=str(data.get("description", "")).strip(), full_points=full_points,
                 quick_points=quick_points or full_points[:2], full_settings=full_settings,
                 quick_settings=quick_settings, path=path)


def available_sweeps(sweeps_dir: Path = SWEEPS_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(sweeps_dir.glob("*.yaml")) if not p.name.startswith("_")}


def resolve_sweeps(name: str, sweeps_dir: Path = SWEEPS_DIR) -> list[Sweep]:
    """``name`` is a sweep name, ``all``, or a path to a sweep YAML file."""
    avail = available_sweeps(sweeps_dir)
    if name == "all":
        return [load_sweep(p) for p in avail.values()]
    if name in avail:
        return [load_sweep(avail[name])]
    if name.endswith((".yaml", ".yml")):
        return [load_sweep(name)]
    raise ValueError(f"sweep={name!r} is not known; choose one of {', '.join(avail)}, 'all', "
                     f"or a path to a sweep .yaml file")
