"""Another recipe in the same study (`recipes:` in a profile): `<variant>@<recipe>` trains its own stage 2 and
variant with that recipe's model and training blocks, from the same foundation and data, and the book shows its rows
beside the profile's own, labelled. The smoke profile carries the SynRef 1.1 demo's additions as its `additions`
recipe."""

from __future__ import annotations

import json

import pytest

from ppcr import report
from ppcr.model.config import TrainingRecipe
from ppcr.recipe.profile import load_profile
from ppcr.report.tables import recipe_additions
from ppcr.training.stage import stage_dirs


def test_recipe_variants_train_with_their_own_blocks(smoke_study_run):
    stages = {s.stage: s for s in stage_dirs(smoke_study_run) if s.seed == 0}
    assert {"glamm_init", "glamm_init@additions", "ppcr", "ppcr@additions", "glamm@additions"} <= set(stages)
    own, other = (json.loads((stages[name].path / "model" / "recipe.json").read_text())
                  for name in ("ppcr", "ppcr@additions"))
    assert own["train_semantic_box"] == 0.0 and other["train_semantic_box"] == 2.0
    assert other["train_box_prompt"] == "mixed" and own["train_box_prompt"] == "pred"
    configs = [json.loads((stages[n].path / "model" / "config.json").read_text()) for n in ("ppcr", "ppcr@additions")]
    assert (configs[0]["soft_prompt_tokens"], configs[1]["soft_prompt_tokens"]) == (1, 4)
    assert configs[1]["variant"] == "ppcr"  # the model is the paper's ppcr; only the recipe differs


def test_the_book_labels_each_recipes_rows(study):
    assert {"glamm@additions", "ppcr@additions"} <= set(study.results) and study.recipes == {
        "additions": "the SynRef 1.1 demo's additions (not in the paper)"}
    methods = [r["method"] for r in report.table1(study).rows]
    assert "PPCR, smoke's recipe" in methods and "PPCR, the SynRef 1.1 demo's additions (not in the paper)" in methods
    assert "Absolute (PPCR \u2212 GLaMM-style), the SynRef 1.1 demo's additions (not in the paper)" in methods
    comparisons = {r["comparison"] for r in report.bootstrap_gains(study, n_boot=50).rows}
    assert "ppcr@additions \u2212 glamm@additions" in comparisons


def test_unknown_recipe_variants_are_refused():
    profile = load_profile("smoke")
    with pytest.raises(ValueError, match="has no recipe variant 'attn_box@additions'"):
        profile.for_variant("attn_box@additions")
    with pytest.raises(ValueError, match="unknown or untrained variants"):
        load_profile("smoke", {"recipes": {"x": {"variants": ["gt_box_oracle"]}}})


def test_every_caption_says_which_settings_are_not_the_papers(study):
    caption = report.table3(study).caption
    assert "Recipe of the smoke profile's own rows: the paper's. " in caption  # smoke trains the paper's recipe
    assert ("Recipe of the rows `<variant>@additions` (the SynRef 1.1 demo's additions (not in the paper)): the "
            "paper's, with settings the paper does not have: detach_box_for_sam=True, "
            "train_box_prompt=mixed") in caption
    assert "soft_prompt_tokens=4" in caption


def test_a_recipe_keeps_the_profiles_weight_paths_and_replaces_its_training(tmp_path):
    """The paper profile's weights come from the command line into `model`: a recipe keeps them (its model block is
    laid over the profile's), while its training block replaces the profile's."""
    profile = load_profile("paper", {"recipes": {"plain": {"variants": ["ppcr"], "model": {"soft_prompt_tokens": 2}}},
                                     "training": {"train_semantic_box": 2.0}})
    profile.model["llava_path"] = "/weights/llava"
    derived, variant, suffix = profile.for_variant("ppcr@plain")
    assert (variant, suffix) == ("ppcr", "@plain")
    assert derived.model["llava_path"] == "/weights/llava" and derived.model["soft_prompt_tokens"] == 2
    assert derived.training == {} and derived.training_recipe().train_semantic_box == 0.0


def test_the_demo_trains_with_the_papers_recipe():
    """The demo's stages 2-3 are the paper's recipe (the additions measured on SynRef 2.0 were dropped): no setting
    the paper does not have, one [P_SEG] slot, and so no second recipe to show beside it."""
    demo = load_profile("demo")
    assert demo.training_recipe() == TrainingRecipe() and demo.model_config("ppcr", 0).soft_prompt_tokens == 1
    assert recipe_additions(demo.training, demo.model) == [] and demo.recipes == {}
