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

A point under ``points:`` (full or quick) may carry ``calib_seeds: [0, 1, 2]``: it is measured at each of
those calibration seeds. Its row at the sweep's own ``seed`` setting is in the sweep's table like every
point's; the row at another seed ``k`` is in the table of the *seed sweep* ``<name>.seed<k>``
(:meth:`Sweep.seed_sweeps`), a sweep of its own with the same settings except ``seed: k`` and only the
points that list ``k``. So each seed's rows have their own point ids (the seed is part of a point's
settings), resume like any others and keep one context per table (``seed`` is a context column); the
``seed`` column of a row is the seed that drew its calibration windows
(``experiments.lm.data.calibration_batches``) and seeded torch for the point. The evaluation windows do
not depend on the seed. ``calib_seeds`` must include the sweep's ``seed`` setting, list distinct
non-negative integers, and sit on a point that uses calibration data (``MethodSpec.needs``); a
``grid:`` entry cannot carry it (list the point under ``points:`` too: a point given twice is one
point). ``experiments.analysis.seeds`` reads a sweep's table with its seed tables and gives each
point's spread over seeds.

Settings (``_defaults.yaml``, sections ``full`` and ``quick``, overridden per sweep): ``seqlen``
(evaluation window), ``eval_tokens`` (evaluation budget), ``eval2_windows`` (windows of ``seqlen``
tokens on the second evaluation text; 0 = none), ``task_items`` (items of the multiple-choice task of
:mod:`experiments.lm.tasks`; 0 = none), ``calib_samples`` and ``calib_seqlen`` (calibration
windows), ``seed``. The runner is :mod:`experiments.run.sweep`.

Settings added after the reference tables were committed (:data:`ADDED_SETTINGS`) stay out of a
point's id (``experiments.run.sweep.point_id``), so the committed rows keep their ids and a resumed
run does not measure them twice; their value is a context column instead
(``experiments.core.runs.SWEEP_CONTEXT_ADDED``).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from experiments.core.runs import PLAIN_NAME_RULE, is_plain_name
from experiments.methods.spec import MethodSpec, parse_spec

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SETTING_KEYS = ("seqlen", "eval_tokens", "calib_samples", "calib_seqlen", "seed", "eval2_windows", "task_items")
ADDED_SETTINGS = ("eval2_windows", "task_items")
# Settings that may be 0: the seed, and a budget whose 0 means "not measured".
_ZERO_OK = ("seed", "eval2_windows", "task_items")
CALIB_SEEDS_KEY = "calib_seeds"
# Names ``<sweep>.seed<k>`` belong to the seed sweeps (the tables of a sweep's points at other calibration seeds).
SEED_SWEEP_NAME = re.compile(r"^(?P<base>.+)\.seed(?P<seed>\d+)$")


def seed_sweep_name(name: str, seed: int) -> str:
    """The seed sweep (and table ``sweep_<this>.csv``) of sweep ``name``'s points at calibration seed ``seed``."""
    return f"{name}.seed{seed}"


@dataclass
class Sweep:
    name: str
    description: str
    full_points: list[MethodSpec]
    quick_points: list[MethodSpec]
    full_settings: dict[str, int]
    quick_settings: dict[str, int]
    path: Path
    # Point (canonical spec JSON) -> the calibration seeds it is measured at (``calib_seeds``), per mode.
    full_calib_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    quick_calib_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    base: str | None = None       # for a seed sweep: the sweep whose points it repeats at another seed

    def points(self, quick: bool) -> list[MethodSpec]:
        return self.quick_points if quick else self.full_points

    def settings(self, quick: bool) -> dict[str, int]:
        return self.quick_settings if quick else self.full_settings

    def calib_seeds(self, quick: bool) -> dict[str, tuple[int, ...]]:
        return self.quick_calib_seeds if quick else self.full_calib_seeds

    def seed_sweeps(self) -> list["Sweep"]:
        """One sweep per calibration seed other than this sweep's own ``seed`` setting that some point
        lists in ``calib_seeds`` (full or quick): the same settings with ``seed`` replaced, and only the
        points listing that seed (none in a mode where no point lists it: the runner skips it there)."""
        def at(quick: bool, seed: int) -> list[MethodSpec]:
            seeds = self.calib_seeds(quick)
            return [p for p in self.points(quick) if seed in seeds.get(_key(p), ())]

        others = sorted({k for quick in (False, True) for seeds in self.calib_seeds(quick).values() for k in seeds
                         if k != self.settings(quick)["seed"]})
        out = []
        for k in others:
            full = at(False, k) if k != self.full_settings["seed"] else []
            quick = at(True, k) if k != self.quick_settings["seed"] else []
            out.append(replace(
                self, name=seed_sweep_name(self.name, k),
                description=f"calibration seed {k} of the points of sweep {self.name} that list it in calib_seeds",
                full_points=full, quick_points=quick, full_settings={**self.full_settings, "seed": k},
                quick_settings={**self.quick_settings, "seed": k}, full_calib_seeds={}, quick_calib_seeds={},
                base=self.name))
        return out


def _key(spec: MethodSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


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
    for k in ADDED_SETTINGS:
        out.setdefault(k, 0)   # an older _defaults.yaml of a user's own: no second text, no task
    for k in SETTING_KEYS:
        v = out.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in _ZERO_OK else 1):
            raise ValueError(f"{where}: setting {k}={v!r} must be a {'non-negative' if k in _ZERO_OK else 'positive'} "
                             f"integer")
    if out["eval_tokens"] < out["seqlen"]:
        raise ValueError(f"{where}: setting eval_tokens={out['eval_tokens']} is smaller than seqlen={out['seqlen']}, "
                         f"so no evaluation window fits; use eval_tokens >= {out['seqlen']} (a multiple of seqlen)")
    return out


def _calib_seeds(value: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) < 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)
            or len(set(value)) != len(value)):
        raise ValueError(f"{where}: {CALIB_SEEDS_KEY}={value!r} must be a list of at least two distinct "
                         f"non-negative integers, e.g. {CALIB_SEEDS_KEY}: [0, 1, 2]")
    return tuple(value)


def _expand(section: Mapping[str, Any], where: str, seed: int | None = None
            ) -> tuple[list[MethodSpec], dict[str, tuple[int, ...]]]:
    """(the points of a sweep file's section, point key -> calib_seeds); ``seed`` is the section's setting."""
    specs: list[MethodSpec] = []
    seeds: dict[str, tuple[int, ...]] = {}
    for i, p in enumerate(section.get("points") or []):
        here = f"{where} points[{i}]"
        opts = dict(p) if isinstance(p, Mapping) else p
        point_seeds = _calib_seeds(opts.pop(CALIB_SEEDS_KEY), here) if isinstance(opts, dict) and \
            CALIB_SEEDS_KEY in opts else None
        spec = parse_spec(opts, where=here)
        specs.append(spec)
        if point_seeds is None:
            continue
        if not spec.needs():
            raise ValueError(f"{here}: {CALIB_SEEDS_KEY} on {spec.label()}, which uses no calibration data, so "
                             f"every seed would give the same result; remove {CALIB_SEEDS_KEY} from it")
        if seed is not None and seed not in point_seeds:
            raise ValueError(f"{here}: {CALIB_SEEDS_KEY}={list(point_seeds)} must include the sweep's seed setting "
                             f"({seed}): the point's row at that seed is the sweep's own table's")
        if seeds.get(_key(spec), point_seeds) != point_seeds:
            raise ValueError(f"{here}: {spec.label()} is listed twice with different {CALIB_SEEDS_KEY} "
                             f"({list(seeds[_key(spec)])} and {list(point_seeds)}); give it once")
        seeds[_key(spec)] = point_seeds
    for i, g in enumerate(section.get("grid") or []):
        if not isinstance(g, Mapping):
            raise ValueError(f"{where} grid[{i}]: expected a mapping of option -> list of values")
        if CALIB_SEEDS_KEY in g:
            raise ValueError(f"{where} grid[{i}]: {CALIB_SEEDS_KEY} belongs on a point under `points:`, not on a "
                             f"grid; list the point there too (a point given twice is one point)")
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
    return unique, seeds


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
    if SEED_SWEEP_NAME.match(name):
        raise ValueError(f"sweep file {path}: name {name!r}{'' if 'name' in data else ' (from the file name)'} ends "
                         f"in .seed<N>, which names the calibration-seed tables of a sweep; choose another name")
    quick = data.get("quick") or {}
    full_settings = merge_settings(defaults.get("full", {}), data.get("settings"), f"{path.name} settings")
    quick_settings = merge_settings(defaults.get("quick", {}), quick.get("settings"), f"{path.name} quick.settings")
    full_points, full_seeds = _expand(data, f"{path.name}", full_settings["seed"])
    quick_points, quick_seeds = _expand(quick, f"{path.name} quick", quick_settings["seed"])
    if not full_points:
        raise ValueError(f"sweep file {path}: no points (give `points:` and/or `grid:`)")
    return Sweep(name=name, description=str(data.get("description", "")).strip(), full_points=full_points,
                 quick_points=quick_points or full_points[:2], full_settings=full_settings,
                 quick_settings=quick_settings, path=path, full_calib_seeds=full_seeds,
                 quick_calib_seeds=quick_seeds if quick_points else {})


def available_sweeps(sweeps_dir: Path = SWEEPS_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(sweeps_dir.glob("*.yaml")) if not p.name.startswith("_")}


def with_seed_sweeps(sweeps: list[Sweep]) -> list[Sweep]:
    """Each sweep followed by its seed sweeps (:meth:`Sweep.seed_sweeps`)."""
    return [s for sw in sweeps for s in (sw, *sw.seed_sweeps())]


def resolve_sweeps(name: str, sweeps_dir: Path = SWEEPS_DIR) -> list[Sweep]:
    """``name`` is a sweep name, ``all``, or a path to a sweep YAML file; each sweep comes with its seed
    sweeps (the points that list ``calib_seeds``, at the other seeds), right after it."""
    avail = available_sweeps(sweeps_dir)
    if name == "all":
        return with_seed_sweeps([load_sweep(p) for p in avail.values()])
    if name in avail:
        return with_seed_sweeps([load_sweep(avail[name])])
    if name.endswith((".yaml", ".yml")):
        return with_seed_sweeps([load_sweep(name)])
    raise ValueError(f"sweep={name!r} is not known; choose one of {', '.join(avail)}, 'all', "
                     f"or a path to a sweep .yaml file")
