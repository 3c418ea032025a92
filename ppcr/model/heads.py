"""The small trainable heads between the stages.

- `SegPromptHead` (`text_hidden_fcs`): LLM hidden state at [SEG] -> Semantic Segmentation Prompt P_seg_txt.
- `SoftTokenProjector`: P_seg_txt -> an input embedding of the LLM (the `[P_SEG]` soft token of branch B).
- `MLPBoxHead` (`F_Map`, Eq. 4): Spatial Segmentation Prompt P_seg_box -> normalised box in [0, 1]^4.
- `AttentionBoxHead`: Table 3's alternative: self- and cross-attention over visual features, P_seg_box as query.
"""

from __future__ import annotations

import torch
from torch import nn


class SegPromptHead(nn.Sequential):
    """Linear-ReLU-Linear from the LLM width to SAM's prompt width (256 for real SAM), as LISA's text_hidden_fcs."""

    def __init__(self, llm_dim: int, prompt_dim: int):
        super().__init__(nn.Linear(llm_dim, llm_dim), nn.ReLU(inplace=True), nn.Linear(llm_dim, prompt_dim))


class SoftTokenProjector(nn.Linear):
    """P_seg_txt (B, C) -> (B, K, d): the input embeddings of the K `[P_SEG]` slots of the spatial prompt (K = 1 in
    the paper; `PPCRConfig.soft_prompt_tokens`)."""

    def __init__(self, prompt_dim: int, llm_dim: int, tokens: int = 1):
        if tokens < 1:
            raise ValueError(f"the spatial prompt needs at least one soft-token slot, got {tokens}")
        super().__init__(prompt_dim, tokens * llm_dim)
        self.tokens, self.llm_dim = tokens, llm_dim

    def forward(self, p_seg_txt: torch.Tensor) -> torch.Tensor:
        return super().forward(p_seg_txt).view(-1, self.tokens, self.llm_dim)


class MLPBoxHead(nn.Module):
    """F_Map: P_seg_box (B, d) -> (x1, y1, x2, y2) in [0, 1] (sigmoid)."""

    def __init__(self, llm_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(llm_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 4),
        )

    def forward(self, p_seg_box: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.mlp(p_seg_box))


class AttentionBoxHead(nn.Module):
    """Queries [P_seg_box, q_1..q_k] attend to each other and to the visual features; token 0 regresses the box.

    image_features: (B, N_img, d) the projected CLIP features the LLM sees (learned positional embedding added).
    """

    def __init__(self, llm_dim: int, dim: int, layers: int, heads: int, num_queries: int, num_image_tokens: int):
        super().__init__()
        self.query_in = nn.Linear(llm_dim, dim)
        self.memory_in = nn.Linear(llm_dim, dim)
        self.memory_pos = nn.Parameter(torch.zeros(1, num_image_tokens, dim))
        self.extra_queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 4))
        nn.init.normal_(self.memory_pos, std=0.02)

    def forward(self, p_seg_box: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("the attention box head needs the visual features")
        b = p_seg_box.shape[0]
        queries = torch.cat([self.query_in(p_seg_box).unsqueeze(1), self.extra_queries.expand(b, -1, -1)], dim=1)
        memory = self.memory_in(image_features.to(p_seg_box.dtype)) + self.memory_pos  # (B, N_img, dim)
        out = self.decoder(queries, memory)  # (B, 1 + k, dim)
        return torch.sigmoid(self.out(out[:, 0]))


def order_box(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (min x, min y, max x, max y): a valid corner order whatever the head emitted."""
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack([torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)],
                       dim=-1)
