"""The study: a run's index (study.json) and its results files, loaded and cached by `load_study`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

SMALL_PROFILES = ("smoke", "demo", "synthetic")
METRICS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "box_acc@0.5", "box_centre_in_gt")


@dataclass
class Study:
    """A study's index (study.json) and every results file it lists: results[variant][seed] -> results dict."""

    run_dir: Path
    index: dict[str, Any]
    results: dict[str, dict[int, dict[str, Any]]]

    @property
    def profile(self) -> str:
        return str(self.index.get("profile", "?"))

    @property
    def preset(self) -> str:
        return str(self.index.get("preset", "?"))

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for by_seed in self.results.values() for seed in by_seed})

    @property
    def variants(self) -> list[str]:
        return [v for v in self.index.get("variants", list(self.results)) if v in self.results]

    @property
    def commit(self) -> str:
        return str(self.index.get("git_commit", "unknown"))

    @property
    def device(self) -> str:
        devices = sorted({str(r.get("meta", {}).get("device", "?")) for s in self.results.values() for r in s.values()})
        return ", ".join(devices) or "?"

    @property
    def is_synthetic(self) -> bool:
        return self.index.get("profile_config", {}).get("data_kind", "synref") == "synref"

    @property
    def datasets(self) -> dict[str, str]:
        """dataset name -> splitBy, in the profile's order."""
        specs = self.index.get("profile_config", {}).get("datasets", [])
        return {d["name"]: d["split_by"] for d in specs}

    @property
    def recipes(self) -> dict[str, str]:
        """The profile's other recipes for stages 2-3 (`recipes:`), name -> label, in the profile's order."""
        specs = self.index.get("profile_config", {}).get("recipes", {}) or {}
        return {name: spec.get("label") or f"{name} recipe" for name, spec in specs.items()}

    @property
    def keys(self) -> list[str]:
        """Every "dataset/split" evaluated, in the order of the first results file."""
        keys: list[str] = []
        for by_seed in self.results.values():
            for res in by_seed.values():
                keys += [k for k in res.get("metrics", {}) if k not in keys]
        return keys

    @cached_property
    def synref_version(self) -> str | None:
        """The SynRef generator version of the study's data ("synref-2.0"; None: not SynRef, or no record); read
        once, as every reproduced caption names it."""
        if not self.is_synthetic:
            return None
        versions = set()
        for name in self.datasets:
            config = self.data_root() / name / "generator_config.json"
            if config.is_file():
                versions.add(json.loads(config.read_text(encoding="utf-8")).get("generator_version"))
        return "/".join(sorted(str(v) for v in versions)) or None

    def data_root(self, override: str | Path | None = None) -> Path:
        """Where the REFER-layout data lie: the override, the profile's data_root, else <run_dir>/data."""
        root = override or self.index.get("profile_config", {}).get("data_root")
        return Path(root) if root else self.run_dir / "data"

    def rows(self, variant: str, key: str, seed: int) -> list[dict[str, Any]]:
        return self.results.get(variant, {}).get(seed, {}).get("rows", {}).get(key, [])

    def _indexed_json(self, key: str) -> dict[int, dict[str, Any]]:
        """seed -> the JSON file study.json lists under `key` for that seed (seeds of this study, files present)."""
        keep, out = self.seeds, {}
        for seed_text, rel in self.index.get(key, {}).items():
            path = self.run_dir / rel
            if int(seed_text) in keep and path.is_file():
                out[int(seed_text)] = json.loads(path.read_text())
        return out

    def prompt_probe(self) -> dict[int, dict[str, Any]]:
        """seed -> the results of `ppcr.evaluation.prompt_probe` for that seed's ppcr (empty for a study without)."""
        return self._indexed_json("prompt_probe")

    def foundation_eval(self) -> dict[int, dict[str, Any]]:
        """seed -> the DONE.json of the stage 0-1 evaluation on this run's val splits (empty for a study without)."""
        return self._indexed_json("foundation_eval")

    def where_answers(self) -> dict[int, dict[str, dict[str, float]]]:
        """seed -> {"<dataset>/val": box figures} of the foundation LLaVA's decoded "where" answers (empty without)."""
        return {seed: info["where_answer"] for seed, info in self.foundation_eval().items() if "where_answer" in info}

    def where_breakdowns(self) -> dict[int, dict[str, dict[str, Any]]]:
        """seed -> {"<dataset>/val": `ppcr.evaluation.foundation_eval.group_shares`}: which expressions the foundation
        LLaVA's decoded "where" answer gets right (empty for evaluations made before the breakdown existed)."""
        return {seed: info["where_breakdown"] for seed, info in self.foundation_eval().items()
                if "where_breakdown" in info}

    def checkpoint(self, variant: str, seed: int | None = None) -> str | None:
        by_seed = self.results.get(variant, {})
        seed = min(by_seed) if seed is None and by_seed else seed
        return by_seed.get(seed, {}).get("meta", {}).get("checkpoint") if seed is not None else None


_CACHE: dict[tuple[str, float, tuple[int, ...] | None], Study] = {}


def load_study(run_dir: str | Path, seeds: list[int] | None = None) -> Study:
    """Read <run_dir>/study.json and the results files it lists (cached in memory per file time).

    seeds: keep only these seeds (None: all the study has).
    """
    run_dir = Path(run_dir).resolve()
    index_path = run_dir / "study.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"no study at {run_dir}: run `python -m ppcr.pipeline study --out {run_dir}` first")
    key = (str(run_dir), index_path.stat().st_mtime, tuple(seeds) if seeds is not None else None)
    if key not in _CACHE:
        index = json.loads(index_path.read_text())
        results: dict[str, dict[int, dict[str, Any]]] = {}
        for variant, by_seed in index.get("results", {}).items():
            for seed_text, rel in by_seed.items():
                seed = int(seed_text)
                if seeds is not None and seed not in seeds:
                    continue
                results.setdefault(variant, {})[seed] = json.loads((run_dir / rel).read_text())
        _CACHE[key] = Study(run_dir, index, results)
    return _CACHE[key]
