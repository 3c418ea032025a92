"""Profiles: YAML files shipped in `ppcr/recipe/profiles/` naming the data, the model preset, the recipe's stages
and their hyper-parameters. `smoke` (seconds, tests), `demo` (CPU, the default of `make book`), `synthetic` (one GPU,
the small-scale reproduction) and `paper` (LLaVA-1.5-7B + SAM ViT-H on RefCOCO/+/g from local paths).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ppcr.model.config import VARIANTS, PPCRConfig, TrainingRecipe, preset_config
from ppcr.model.mllm import check_llava_path

PROFILES = resources.files("ppcr.recipe") / "profiles"
# the shipped profiles: every YAML file of that folder
PROFILE_NAMES = tuple(sorted(p.name.removesuffix(".yaml") for p in PROFILES.iterdir() if p.name.endswith(".yaml")))


@dataclass
class DataSpec:
    """One benchmark: a SynRef suite (generated) or a REFER dataset (read from `root`)."""

    name: str  # synref | synref+ | synrefg | refcoco | refcoco+ | refcocog
    split_by: str
    eval_splits: list[str]
    refs: int = 0  # SynRef only: refs to generate


@dataclass
class StageSpec:
    steps: int = 0  # optimisation steps (or, when epochs > 0, computed from the data size)
    epochs: float = 0.0
    batch_size: int = 8
    lr: float = 3e-4
    # stages 2-3: the learning rate of SAM's prompt encoder and mask decoder (None: `lr`), e.g. to keep the
    # pretrained SAM box-led while the LLM side learns at a higher one
    sam_lr: float | None = None
    warmup_steps: int = 100
    grad_accum: int = 1
    objects_per_image: int = 1  # stage 0: prompts decoded per image encoding (batch_size counts images there)
    box_prob: float = 0.5  # stage 0: share of steps prompted with boxes (the rest with points)
    # stage 1: the grounding probe's loss (see MllmPretrainer): read at the first box bin ("first") or at every
    # answer position of a "where" answer ("all"), L1 times probe_weight, plus GIoU when probe_giou
    probe_positions: str = "first"
    probe_weight: float = 1.0
    probe_giou: bool = True
    # stage 1, with probe_positions "all": the probe also reads every answer position of the "describe" answers
    # (the answers to the semantic templates), so the position stage 2 reads [SEG] from learns where the object is
    probe_describe: bool = False
    # stage 0: train only SAM's prompt encoder and mask decoder, the image encoder frozen (its embeddings computed
    # without gradient): a cheaper continuation of a trained SAM, as the later stages train SAM
    freeze_sam_encoder: bool = False
    # stage 1: keep the CLIP tower frozen (as LLaVA's own stage 1 does), e.g. after the `vision_pretrain` stage
    freeze_vision: bool = False
    # stage 1: add "where"/"describe" questions about every object whose colour and shape are unique on its image
    # ("the <colour> <shape>", `ObjectGroundingQuestions`) to the referring expressions
    object_grounding: bool = False
    # stage 1: weight of the image-token grounding loss (MllmPretrainer; needs the model's image_after_prompt)
    image_grounding: float = 0.0

    def total_steps(self, n_samples: int) -> int:
        if self.epochs > 0:
            return max(1, int(self.epochs * n_samples // (self.batch_size * self.grad_accum)))
        return self.steps


@dataclass
class RecipeSpec:
    """Another recipe for stages 2-3 in the same study (a profile's `recipes:` entry): its `variants` are trained
    from the same foundation and data, named `<variant>@<recipe>` (e.g. `ppcr@paper`: the paper's recipe beside the
    profile's own). Its `training` block replaces the profile's (an empty one is the paper's recipe); its `model`
    block is laid over the profile's (whose weight paths and precision it keeps)."""

    variants: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # how the book names the recipe's rows


RECIPE_MARK = "@"


def model_variant(name: str) -> str:
    """The model variant of a study's variant name: `ppcr@paper` -> `ppcr` (the recipe changes training only)."""
    return name.partition(RECIPE_MARK)[0]


@dataclass
class Profile:
    name: str
    preset: str
    model: dict[str, Any] = field(default_factory=dict)  # PPCRConfig overrides: the architecture
    training: dict[str, Any] = field(default_factory=dict)  # TrainingRecipe overrides: how stages 2-3 train
    data_kind: str = "synref"  # synref (generated here) | refer (local RefCOCO/+/g)
    data_root: str | None = None  # refer: where the REFER layout lies; synref: None = <out>/data
    image_size: int = 256
    data_seed: int = 0
    datasets: list[DataSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: ["glamm", "spatial_re", "spatial_re_seg", "ppcr",
                                                         "attn_box"])
    # sam_pretrain, [vision_pretrain,] mllm_pretrain, glamm_init (stage 2), variants (stage 3): as the stage folders
    stages: dict[str, StageSpec] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | bf16
    deepspeed_config: str | None = None  # a ZeRO-2 JSON for the paper profile
    checkpoint_every: int = 200
    eval_max_expressions: int | None = None  # per split; None = every expression
    eval_batch_size: int = 16
    diag_every: int = 0  # held-out diagnostics every N steps of every stage (0: only at each stage's end)
    diag_expressions: int = 48  # val expressions per dataset in those diagnostics (None/0: no diagnostics)
    foundation: str = "train"  # stages 0-1: "train" them in the run, or start from the "shipped" weights
    # stage 3 starts from this PPCR checkpoint in place of stage 2 (e.g. `ppcr convert glamm`'s output: the paper's
    # start from GLaMM's weights); None: stage 2 trains it
    init_from: str | None = None
    # SAM's frozen-encoder embeddings, cached per image (`ppcr.training.cache`): stored as float32 or float16 (half
    # the disk and memory, as the paper profile on RefCOCO's images needs), in memory up to this many GiB
    sam_cache_dtype: str = "float32"
    sam_cache_memory_gb: float = 2.0
    device: str = "auto"
    num_workers: int = 0
    # the study trains and evaluates this many seeds at once, each in its own process; on a CPU each gets
    # cpu_count // seed_workers threads (two 1-thread processes ran 1.2-1.5 times the stage-3 steps per second of one
    # 2-thread process: its steps are many small ops; notes/learning.md)
    seed_workers: int = 1
    # other recipes for stages 2-3, trained and evaluated beside the profile's own (`RecipeSpec`)
    recipes: dict[str, RecipeSpec] = field(default_factory=dict)
    source: str = ""  # where the profile was read from

    # ------------------------------------------------------------------------------------------------------
    def model_config(self, variant: str, seed: int) -> PPCRConfig:
        return preset_config(self.preset, variant=variant, seed=seed, **self.model)

    def training_recipe(self) -> TrainingRecipe:
        return TrainingRecipe.from_dict(self.training)

    def check_weight_paths(self) -> None:
        """A profile on real data (`data_kind: refer`, the paper's) starts from pretrained LLaVA and SAM: refuse to
        start without them (a random model would train and report numbers), before anything large is loaded."""
        if self.data_kind != "refer":
            return
        llava, sam = self.model.get("llava_path"), self.model.get("sam_checkpoint")
        if not llava or not sam:
            raise ValueError(f"profile {self.name!r} starts from pretrained weights: give --llava-path (a "
                             "llava-hf/llava-1.5-7b-hf folder) and --sam-checkpoint (sam_vit_h_4b8939.pth), or set "
                             "model.llava_path and model.sam_checkpoint in the profile")
        check_llava_path(llava)
        if not Path(sam).is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {sam}")

    def recipe_variants(self) -> list[str]:
        """The `<variant>@<recipe>` names of the other recipes' variants, in the profile's order."""
        return [f"{v}{RECIPE_MARK}{name}" for name, spec in self.recipes.items() for v in spec.variants]

    def for_variant(self, name: str) -> tuple["Profile", str, str]:
        """(the profile a variant trains with, the model variant, the stage-folder suffix): for `<variant>@<recipe>`
        the profile with that recipe's model and training blocks and the suffix `@<recipe>`; else this profile."""
        variant, mark, recipe = name.partition(RECIPE_MARK)
        if not mark:
            return self, variant, ""
        if recipe not in self.recipes or variant not in self.recipes[recipe].variants:
            raise ValueError(f"profile {self.name!r} has no recipe variant {name!r} (it has {self.recipe_variants()})")
        spec = self.recipes[recipe]
        return dataclasses.replace(self, model={**self.model, **spec.model}, training=dict(spec.training),
                                   recipes={}, variants=list(spec.variants)), variant, f"{RECIPE_MARK}{recipe}"

    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise KeyError(f"profile {self.name!r} has no stage {name!r} (it has {sorted(self.stages)})")
        return self.stages[name]

    def deepspeed_path(self) -> str | None:
        """The DeepSpeed JSON the profile names: a path, or a file shipped beside this module (`ds_zero2.json`)."""
        if not self.deepspeed_config:
            return None
        path = Path(self.deepspeed_config)
        if not path.is_file():
            path = Path(__file__).with_name(self.deepspeed_config)
        return str(path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def fingerprint(self, *parts: Any) -> str:
        """A short hash of (parts of) the profile: stage outputs are cached under it. A `StageSpec` counts only
        its fields that differ from their defaults, so a new recipe option leaves the caches of stages that do not
        use it valid."""
        blob = json.dumps([_fingerprint_part(p) for p in parts], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _fingerprint_part(part: Any) -> Any:
    if isinstance(part, StageSpec):
        default = StageSpec()
        return {f.name: getattr(part, f.name) for f in dataclasses.fields(part)
                if getattr(part, f.name) != getattr(default, f.name)}
    return dataclasses.asdict(part) if dataclasses.is_dataclass(part) else part


# keys that profiles once had: the one-line refusal says what replaced them
REMOVED_KEYS = {"init": "the shipped foundation is no longer continued; `python -m ppcr.foundation train` trains it "
                        "from scratch with one recipe"}


def _build(cls: type, raw: dict[str, Any], where: str, source: str) -> Any:
    """`cls(**raw)`, refusing unknown keys in one line (a removed key says what replaced it)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        why = "; ".join(f"{k}: {REMOVED_KEYS[k]}" for k in unknown if k in REMOVED_KEYS)
        raise ValueError(f"profile {source}: {where} has unknown keys {unknown}" + (f" ({why})" if why else ""))
    return cls(**raw)


def _parse(raw: dict[str, Any], source: str) -> Profile:
    raw = copy.deepcopy(raw)
    raw["datasets"] = [_build(DataSpec, d, "a dataset", source) for d in raw.get("datasets", [])]
    raw["stages"] = {k: _build(StageSpec, v, f"stage {k}", source) for k, v in raw.get("stages", {}).items()}
    raw["recipes"] = {k: _build(RecipeSpec, v, f"recipe {k}", source) for k, v in raw.get("recipes", {}).items()}
    if "betas" in raw:
        raw["betas"] = tuple(raw["betas"])
    profile = _build(Profile, {**raw, "source": source}, "the profile", source)
    unknown = [v for v in profile.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"profile {profile.name}: unknown variants {unknown}")
    preset_config(profile.preset, **profile.model)  # validates the overrides early
    profile.training_recipe()
    for name, spec in profile.recipes.items():
        if RECIPE_MARK in name or not name:
            raise ValueError(f"profile {profile.name}: recipe name {name!r} must be a word without {RECIPE_MARK!r}")
        if unknown := [v for v in spec.variants if v not in VARIANTS or v == "gt_box_oracle"]:
            raise ValueError(f"profile {profile.name}: recipe {name} has unknown or untrained variants {unknown}")
        preset_config(profile.preset, **{**profile.model, **spec.model})
        TrainingRecipe.from_dict(spec.training)
    for stage_name, spec in profile.stages.items():
        if spec.probe_positions not in ("first", "all"):
            raise ValueError(f"profile {profile.name}: stage {stage_name} probe_positions must be 'first' or 'all'")
    if profile.sam_cache_dtype not in ("float32", "float16"):
        raise ValueError(f"profile {profile.name}: sam_cache_dtype must be float32 or float16")
    if profile.seed_workers < 1:
        raise ValueError(f"profile {profile.name}: seed_workers must be at least 1, not {profile.seed_workers}")
    if profile.foundation not in ("train", "shipped"):
        raise ValueError(f"profile {profile.name}: foundation must be 'train' or 'shipped', not {profile.foundation!r}")
    if profile.foundation == "shipped" and (profile.preset != "small" or profile.data_kind != "synref"):
        raise ValueError(f"profile {profile.name}: the shipped foundation exists for the small preset on SynRef only")
    return profile


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> Profile:
    """A shipped profile by name, or a YAML file by path; `overrides` replace top-level keys."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, source = path.read_text(), str(path)
    else:
        if name_or_path not in PROFILE_NAMES:
            raise ValueError(f"unknown profile {name_or_path!r}: choose one of {list(PROFILE_NAMES)} or a YAML path")
        res = PROFILES / f"{name_or_path}.yaml"
        text, source = res.read_text(), f"ppcr/recipe/profiles/{name_or_path}.yaml"
    raw = yaml.safe_load(text)
    if overrides:
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return _parse(raw, source)
