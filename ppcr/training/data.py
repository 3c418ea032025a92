"""The data every training stage reads: the profile's SynRef suites (generated) or REFER datasets (checked), their
splits as `ReferSegDataset`s, and the fixed held-out subset of the stages' diagnostics."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from ppcr.data.dataset import ReferSegDataset
from ppcr.data.refer import Refer
from ppcr.data.synref import GENERATOR_VERSION, generate_suite
from ppcr.data.transforms import ImagePrep
from ppcr.recipe.profile import Profile
from ppcr.training import distributed
from ppcr.training.diagnostics import val_subset


def data_version(profile: Profile) -> str:
    """Part of every stage fingerprint: a new generator version invalidates the stages trained on old data."""
    if profile.data_kind == "synref":
        return GENERATOR_VERSION
    return str(profile.data_root)


def data_root(profile: Profile, out: str | Path) -> Path:
    if profile.data_root:
        return Path(profile.data_root)
    if profile.data_kind == "refer":
        raise ValueError(f"profile {profile.name!r} reads RefCOCO/+/g: give data_root (see data_scripts/README.md)")
    return Path(out) / "data"



def prepare_data(profile: Profile, out: str | Path, progress: bool = True, workers: int = 2) -> Path:
    """Generate the profile's SynRef suites (cached by their generator config; `workers` generator processes, which
    do not change the files) or check the REFER root."""
    root = data_root(profile, out)
    if profile.data_kind == "synref":
        with distributed.main_first():  # several training processes: one generates, the others find it cached
            for spec in profile.datasets:
                generate_suite(spec.name, root, n_refs=spec.refs, seed=profile.data_seed,
                               image_size=profile.image_size, workers=workers, progress=progress)
    else:
        for spec in profile.datasets:
            Refer(root, spec.name, spec.split_by)  # raises a clear error for a missing file
    return root


def split_datasets(profile: Profile, root: Path, prep: ImagePrep, split: str = "train") -> list[ReferSegDataset]:
    return [ReferSegDataset(Refer(root, spec.name, spec.split_by), split, prep) for spec in profile.datasets]


def train_dataset(profile: Profile, root: Path, prep: ImagePrep) -> Dataset:
    """The union of every dataset's train split (one model for all three, as LISA/GLaMM/PPCR train)."""
    return ConcatDataset(split_datasets(profile, root, prep))


def diagnostics_data(profile: Profile, root: Path, prep: ImagePrep) -> Dataset | None:
    """The fixed val subset every stage's held-out diagnostics run on (None when the profile turns them off)."""
    if not profile.diag_expressions:
        return None
    return val_subset(split_datasets(profile, root, prep, "val"), profile.diag_expressions)
