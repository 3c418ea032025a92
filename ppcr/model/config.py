"""Configuration of the PPCR model: one set of classes, three presets (`tiny`, `small`, `paper`).

Every preset builds the *same* modules (transformers' LLaVA, peft's LoRA, segment-anything's SAM and the PPCR
heads); only the sizes and the weight paths differ. `paper` is LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B) and
SAM ViT-H; `small` is what the synthetic reproduction trains; `tiny` runs in seconds on a CPU for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Variants (Tables 2 and 3 of the paper). One switch each; everything else is shared.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """What a variant changes.

    spatial_source: where branch B's prompt comes from: None (no spatial step), "seg" (P_seg_txt alone, PPCR),
        "re" (the raw expression), "re_seg" (both).
    box_head: "mlp" (F_Map, Eq. 4) or "attn" (self-/cross-attention stack over visual features).
    eval_box: which box SAM gets at evaluation: "none", "pred" or "gt" (the oracle).
    """

    name: str
    spatial_source: str | None
    box_head: str
    eval_box: str

    @property
    def uses_spatial_step(self) -> bool:
        return self.spatial_source is not None


VARIANTS: dict[str, VariantSpec] = {
    "glamm": VariantSpec("glamm", None, "mlp", "none"),  # Table 2 "w/o Spatial SP"
    "spatial_re": VariantSpec("spatial_re", "re", "mlp", "pred"),  # Table 2 "w/ Spatial SP (RE)"
    "spatial_re_seg": VariantSpec("spatial_re_seg", "re_seg", "mlp", "pred"),  # "w/ Spatial SP (RE + P_seg_txt)"
    "ppcr": VariantSpec("ppcr", "seg", "mlp", "pred"),  # the full model
    "attn_box": VariantSpec("attn_box", "seg", "attn", "pred"),  # Table 3 "w/ Attn-based Box Prediction"
    "gt_box_oracle": VariantSpec("gt_box_oracle", "seg", "mlp", "gt"),  # Table 3 "w/ GT Box (Oracle)"
}


def variant_spec(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


# ---------------------------------------------------------------------------------------------------------------
# Sub-configs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """CLIP vision tower (transformers' CLIPVisionConfig)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    projection_dim: int = 768

    @property
    def patch_grid(self) -> int:  # patches per side of the (square) CLIP input
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:  # LLaVA "default" strategy drops CLS
        return self.patch_grid ** 2


@dataclass
class TextConfig:
    """LLaMA language model (transformers' LlamaConfig). vocab_size is set from the tokenizer."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32064


@dataclass
class SamSettings:
    """segment-anything's SAM (ImageEncoderViT, PromptEncoder, MaskDecoder + TwoWayTransformer)."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class LoraSettings:
    """LoRA of both branches. The regex restricts LoRA to the *language model* (not CLIP's q/v projections)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|v_proj)$"


@dataclass
class LossWeights:
    """Eq. 7: L = bce * L_BCE + dice * L_Dice + l1 * L_l1(box) + ce * L_CE (the paper's lambda_1..4)."""

    bce: float = 2.0
    dice: float = 0.5
    l1: float = 2.0
    ce: float = 0.5


# LLaVA-1.5's conversation template ("vicuna_v1").
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class PPCRConfig:
    """The architecture: everything that builds the model and loads its weights (`PPCRModel.build`,
    `from_pretrained`). How it is trained is a `TrainingRecipe`; which prompt templates it reads at evaluation, a
    `PromptChoice`."""

    preset: str = "paper"
    variant: str = "ppcr"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sam: SamSettings = field(default_factory=SamSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # weights: local paths only (nothing here reaches a hub). None = build from config with random weights.
    llava_path: str | None = None  # folder in the llava-hf/llava-1.5-7b-hf layout
    sam_checkpoint: str | None = None  # sam_vit_h_4b8939.pth (loaded with weights_only=True) or .safetensors
    tokenizer_path: str | None = None  # defaults to llava_path; small presets build their own tokenizer
    vision_feature_layer: int = -2  # LLaVA-1.5 uses the penultimate CLIP layer
    projector_hidden_act: str = "gelu"
    system_prompt: str = LLAVA_SYSTEM_PROMPT
    # the image tokens after the question instead of before it (LLaVA-1.5's order); see prompts.conversation
    image_after_prompt: bool = False
    dtype: str = "bfloat16"  # of the MLLM; SAM's decoder and the PPCR heads run in float32
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    box_head_hidden: int = 256  # F_Map: Linear-ReLU-Linear-ReLU-Linear(4)-sigmoid
    attn_box_dim: int = 256
    attn_box_layers: int = 3
    attn_box_heads: int = 8
    attn_box_queries: int = 4  # learned queries beside P_seg_box in the attention head
    # not in the paper (a small-scale choice; 1 = the paper's single slot): how many input slots of the spatial
    # prompt carry P_seg_txt. `[P_SEG]` becomes this many `[P_SEG]` tokens and the soft-token projection maps the one
    # vector P_seg_txt to as many input embeddings, so the small LLM has more positions to read it from. On the
    # SynRef 1.1 demo (1,200 evaluated expressions per seed) 4 slots lifted ppcr's box accuracy@0.5 by +1.8 / +10.3
    # points and its mIoU by -0.2 / +3.7 (seeds 0 / 1; notes/learning.md); on SynRef 2.0 the demo dropped it with
    # the other additions.
    soft_prompt_tokens: int = 1
    seed: int = 0

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def spec(self) -> VariantSpec:
        return variant_spec(self.variant)

    @property
    def sam_prompt_dim(self) -> int:
        return self.sam.prompt_embed_dim

    # -- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PPCRConfig":
        d = dict(d)
        subs = {"vision": VisionConfig, "text": TextConfig, "sam": SamSettings, "lora": LoraSettings}
        for key, sub_cls in subs.items():
            if key in d and isinstance(d[key], dict):
                sub = dict(d[key])
                if key == "sam" and "encoder_global_attn_indexes" in sub:
                    sub["encoder_global_attn_indexes"] = tuple(sub["encoder_global_attn_indexes"])
                d[key] = sub_cls(**sub)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PPCRConfig keys: {sorted(unknown)}")
        cfg = cls(**d)
        variant_spec(cfg.variant)  # validate
        return cfg

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load_json(cls, path: str | Path) -> "PPCRConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "PPCRConfig":
        """A copy with `changes`. A dict for a sub-config (vision, text, sam, lora) changes only the fields it
        names, e.g. `lora={"r": 32}` from a profile's `model:` block."""
        for key, value in changes.items():
            if isinstance(value, dict) and dataclasses.is_dataclass(getattr(self, key, None)):
                changes[key] = dataclasses.replace(getattr(self, key), **value)
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
# How the model is trained, and how it is prompted at evaluation: apart from the architecture
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRecipe:
    """How stages 2-3 train a PPCR model (a profile's `training:` block): Eq. 7's weights and the box SAM gets while
    training, and the reproduction's additions to the paper's recipe (weight 0 = off). Not needed to run a trained
    model, but saved beside its config (`recipe.json`), since the additions' training-only heads are part of its
    checkpoint."""

    loss: LossWeights = field(default_factory=LossWeights)
    detach_box_for_sam: bool = False  # True: the mask loss does not flow into the box head through SAM
    # box SAM gets during training: "pred" (the paper), "gt" (teacher forcing) or "mixed" (each expression gets its
    # ground-truth box with probability train_gt_box_prob, else the predicted one); ground-truth boxes are jittered
    # by up to train_gt_box_jitter of their size per coordinate while training
    train_box_prompt: str = "pred"
    train_gt_box_prob: float = 0.5
    train_gt_box_jitter: float = 0.1
    # not in the paper (a small-scale recipe choice, 0 = off): the weight of the image-token grounding loss in
    # stages 2-3, the one the small foundation's stage 1 trains with. Every LLM pass of a training step (branch A,
    # and branch B where the variant has it) puts a linear head on its image tokens' last hidden states, softmaxed
    # over the image, whose mass must sit on the target's patches. Needs image_after_prompt (the image tokens must
    # see the expression, or branch B's P_seg_txt soft token).
    train_image_grounding: float = 0.0
    # not in the paper (a small-scale recipe choice, 0 = off): the weight of an auxiliary box L1 on P_seg_txt in
    # stages 2-3. A second F_Map-shaped MLP (`semantic_box_head`, training only) regresses the target's normalised
    # box from P_seg_txt, so the semantic prompt that branch B reads carries the target's place as well as its
    # appearance; at this scale stage 2's mask loss alone does not put it there (notes/learning.md).
    train_semantic_box: float = 0.0
    # not in the paper (a small-scale recipe choice, 0 = off): the weight of a distillation term on branch B in stage
    # 3 for the variants whose spatial prompt holds the `[P_SEG]` soft token. The same spatial template with the
    # expression in place of the soft token (a question stage 1 trained the LLaVA on) runs through the LLM without
    # LoRA, as the teacher; branch B's last hidden states at the query position and on the image tokens must match
    # the teacher's (mean squared error relative to the teacher's mean square). At the start of stage 3 the soft
    # token is a fresh projection the LLM has never seen, and branch B's query state holds none of the box (a probe
    # of F_Map's shape: 1.5-4 % box IoU, against 26-40 % with the expression; notes/learning.md). The teacher
    # plays the part of the paper's grounding-pretrained (GranD) initialisation of LoRA B.
    train_spatial_distill: float = 0.0

    def __post_init__(self) -> None:
        if self.train_box_prompt not in ("pred", "gt", "mixed"):
            raise ValueError(f"train_box_prompt must be 'pred', 'gt' or 'mixed', not {self.train_box_prompt!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingRecipe":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training recipe keys: {sorted(unknown)}")
        if isinstance(d.get("loss"), dict):
            d["loss"] = LossWeights(**d["loss"])
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainingRecipe":
        if isinstance(changes.get("loss"), dict):
            changes["loss"] = dataclasses.replace(self.loss, **changes["loss"])
        return dataclasses.replace(self, **changes)


@dataclass
class PromptChoice:
    """Which question template each branch reads outside training (training samples them; evaluation, `predict`
    and the FLOP count take these, the first by default)."""

    semantic_template: int = 0
    spatial_template: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def paper_config(**overrides: Any) -> PPCRConfig:
    """LLaVA-1.5-7B (CLIP ViT-L/14-336, 576 image tokens, Vicuna-7B) + SAM ViT-H, bf16, gradient checkpointing."""
    return PPCRConfig(preset="paper").replace(**overrides)


def small_config(**overrides: Any) -> PPCRConfig:
    """The model the synthetic (SynRef) reproduction trains: about 8.2M parameters."""
    cfg = PPCRConfig(
        preset="small",
        vision=VisionConfig(image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=512, projection_dim=192),
        text=TextConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=704, max_position_embeddings=512, vocab_size=0),
        sam=SamSettings(img_size=256, patch_size=16, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=4,
                        encoder_global_attn_indexes=(1, 3), window_size=8, prompt_embed_dim=128,
                        decoder_depth=2, decoder_mlp_dim=512, decoder_num_heads=4, mask_in_chans=8,
                        iou_head_hidden_dim=128),
        lora=LoraSettings(),
        system_prompt="",
        # the question before the image: the from-scratch LLM grounds only when its image tokens can attend to the
        # expression (notes/learning.md, "The question before the image"); the paper preset keeps LLaVA's order
        image_after_prompt=True,
        dtype="float32",
        gradient_checkpointing=False,
        box_head_hidden=256,
        attn_box_dim=128,
        attn_box_layers=3,
        attn_box_heads=4,
    )
    return cfg.replace(**overrides)


def tiny_config(**overrides: Any) -> PPCRConfig:
    """Seconds on a CPU: for tests."""
    cfg = PPCRConfig(
        preset="tiny",
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, projection_dim=32),
        text=TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=128, max_position_embeddings=256, vocab_size=0),
        sam=SamSettings(img_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                        encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32,
                        decoder_depth=1, decoder_mlp_dim=64, decoder_num_heads=2, mask_in_chans=4,
                        iou_head_hidden_dim=32),
        lora=LoraSettings(),
        system_prompt="",
        dtype="float32",
        gradient_checkpointing=False,
        box_head_hidden=32,
        attn_box_dim=32,
        attn_box_layers=2,
        attn_box_heads=2,
    )
    return cfg.replace(**overrides)


PRESETS = {"paper": paper_config, "small": small_config, "tiny": tiny_config}


def preset_config(name: str, **overrides: Any) -> PPCRConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
