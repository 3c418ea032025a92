"""Prompt templates (Fig. 4 and Fig. 5 of the paper) and the LLaVA-1.5 conversation they are wrapped in.

The answer of each pass contains a new token: `[SEG]` (semantic pass, branch A) and `[BOX]` (spatial pass,
branch B). The spatial prompt carries the Semantic Segmentation Prompt as a soft token `[P_SEG]`, whose input
embedding is replaced by a projection of P_seg_txt.
"""

from __future__ import annotations

import random

SEG_TOKEN = "[SEG]"
BOX_TOKEN = "[BOX]"
PSEG_TOKEN = "[P_SEG]"
IMAGE_TOKEN = "<image>"
NEW_TOKENS = (SEG_TOKEN, BOX_TOKEN, PSEG_TOKEN)

# Fig. 4: semantic prompt templates (the figure lists some twice; the distinct ones). {T} = the expression.
SEMANTIC_TEMPLATES: tuple[str, ...] = (
    "Can you segment the {T} in this image?",
    "Please segment {T} in this image.",
    "What is {T} in this image? Please respond with segmentation mask.",
    "What is {T} in this image? Please output segmentation mask.",
    "Can you segment the {T} in this image.",
    "Could you provide a segmentation mask for the {T} in this image.",
    "Please identify and segment the {T} in this image.",
    "Where is the {T} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {T} in this image with a segmentation mask?",
    "Can you highlight the {T} in this image with a segmentation mask.",
)

# Fig. 5: spatial prompt templates, conditioned on P_seg_txt alone (PPCR). {P} = the soft token.
SPATIAL_TEMPLATES: tuple[str, ...] = (
    "Given the token {P} for the segmented region of the object, provide its bounding box.",
    "Using {P} to refer to the segmented object, output the bounding box coordinates.",
    "For the object marked by {P}, return its bounding box.",
    "Identify the object in the image marked as {P}, please predict a bounding box that encloses it.",
)

# Table 2 ablations (templates quoted in §4.4).
SPATIAL_RE_TEMPLATES: tuple[str, ...] = ("Where is the target described by {T}? Please respond with a bounding box.",)
SPATIAL_RE_SEG_TEMPLATES: tuple[str, ...] = ("Take the region marked by {P} for {T}, and provide its bounding box.",)

SEMANTIC_ANSWER = f"Sure, it is {SEG_TOKEN}."
SPATIAL_ANSWER = f"Sure, the bounding box is {BOX_TOKEN}."


def spatial_templates(source: str) -> tuple[str, ...]:
    """The spatial templates of a variant's `spatial_source` ("seg", "re" or "re_seg")."""
    table = {"seg": SPATIAL_TEMPLATES, "re": SPATIAL_RE_TEMPLATES, "re_seg": SPATIAL_RE_SEG_TEMPLATES}
    if source not in table:
        raise ValueError(f"unknown spatial prompt source {source!r}")
    return table[source]


def soft_token_as_expression(template: str) -> str:
    """A spatial template with the expression where the soft token stands: the question stage 1 trains the LLaVA
    on, and the one the teacher of `PPCRConfig.train_spatial_distill` reads."""
    return template.replace("{P}", "{T}")


def check_expression(expression: str) -> str:
    """Normalise an expression, refusing empty ones with a clear error."""
    if not isinstance(expression, str):
        raise TypeError(f"a referring expression must be a str, got {type(expression).__name__}")
    text = " ".join(expression.strip().split())
    if not text:
        raise ValueError("empty referring expression: give the text that names the object to segment")
    return text


def fill(template: str, expression: str | None = None, soft_tokens: int = 1) -> str:
    """The template with the expression in `{T}` and `soft_tokens` `[P_SEG]` slots in `{P}`."""
    out = template
    if "{T}" in out:
        if expression is None:
            raise ValueError(f"template needs an expression: {template!r}")
        out = out.replace("{T}", check_expression(expression))
    return out.replace("{P}", " ".join([PSEG_TOKEN] * soft_tokens))


def pick_template(templates: tuple[str, ...], rng: random.Random | None, eval_index: int) -> str:
    """Training samples a template per expression (rng given); evaluation uses a fixed one."""
    if rng is None:
        return templates[eval_index % len(templates)]
    return templates[rng.randrange(len(templates))]


def conversation(prompt: str, answer: str, system_prompt: str, image_after_prompt: bool = False) -> tuple[str, str]:
    """LLaVA-1.5 (vicuna_v1) turn: returns (context, answer) so the answer's tokens can be labelled.

    LLaVA-1.5 puts the image first (`USER: <image>\n{prompt}`). With `image_after_prompt` the question comes first
    (`USER: {prompt}\n<image>`), so under the causal mask every image token can attend to the expression."""
    head = f"{system_prompt} " if system_prompt else ""
    user = f"{prompt}\n{IMAGE_TOKEN}" if image_after_prompt else f"{IMAGE_TOKEN}\n{prompt}"
    return f"{head}USER: {user} ASSISTANT:", f" {answer}"
