"""Costs: the box heads' parameters, FLOPs and time (Table 3's efficiency claim) and the training stages'."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ppcr.model.config import preset_config
from ppcr.model.heads import AttentionBoxHead, MLPBoxHead
from ppcr.report.study import Study
from ppcr.report.tables import Column, Table, scale_text


def mlp_head_flops(d: int, hidden: int) -> int:
    """Multiply-adds x 2 of F_Map for one expression: d->h, h->h, h->4."""
    return 2 * (d * hidden + hidden * hidden + hidden * 4)


def attention_head_flops(d: int, dim: int, layers: int, queries: int, image_tokens: int) -> int:
    """Multiply-adds x 2 of the attention head for one expression (norms, softmax and biases left out; the same
    count as `ppcr.perf.flops.box_head_flops`).

    Per decoder layer with Q = 1 + queries query tokens and N image tokens: self-attention (QKV and output
    projections, scores, weighted sum), cross-attention (Q/output projections on the queries, K/V projections of
    the N image tokens, scores, weighted sum) and the 4x feed-forward; plus the input projections of the query and
    the image features and the output MLP.
    """
    q, n = 1 + queries, image_tokens
    self_attn = 4 * q * dim * dim + 2 * q * q * dim
    cross_attn = 2 * q * dim * dim + 2 * n * dim * dim + 2 * q * n * dim
    ffn = 8 * q * dim * dim
    per_layer = self_attn + cross_attn + ffn
    inputs = d * dim + n * d * dim
    out = dim * dim + dim * 4
    return 2 * (layers * per_layer + inputs + out)


def time_modules(modules: dict[str, Any], inputs: tuple[Any, ...], repeats: int, device: str,
                 warmup: int = 3) -> dict[str, float]:
    """Median seconds of one forward of each module. Runs are interleaved (a, b, a, b, ...) so a change of load on
    the machine affects every module alike; on a CPU they run on one thread (no contention between threads)."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in modules}
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                for name, module in modules.items():
                    sync()
                    tic = time.perf_counter()
                    module(*inputs)
                    sync()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)
    return {name: float(statistics.median(t)) for name, t in times.items()}


def box_head_costs(study: Study | None = None, preset: str | None = None, device: str = "cpu", batch: int = 64,
                   repeats: int = 20) -> Table:
    """Parameters, analytic FLOPs and measured forward time per expression of F_Map (MLP) vs the attention head.

    The heads are built from `ppcr.model.heads` at the preset's sizes (the study's preset unless `preset` is
    given) with random weights; a batch of `batch` random P_seg_box vectors (and image features for the attention
    head) is timed on `device`, median of `repeats` forwards.
    """


    preset = preset or (study.preset if study is not None else "tiny")
    cfg = preset_config(preset)
    d, n_img = cfg.text.hidden_size, cfg.vision.num_image_tokens
    torch.manual_seed(0)
    heads = {
        "F_Map (MLP): PPCR": (MLPBoxHead(d, cfg.box_head_hidden),
                              mlp_head_flops(d, cfg.box_head_hidden)),
        "attention: attn_box": (
            AttentionBoxHead(d, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_heads, cfg.attn_box_queries,
                             n_img),
            attention_head_flops(d, cfg.attn_box_dim, cfg.attn_box_layers, cfg.attn_box_queries, n_img)),
    }
    p_seg_box = torch.randn(batch, d, device=device)
    image_features = torch.randn(batch, n_img, d, device=device)
    seconds = time_modules({name: head.to(device).eval() for name, (head, _) in heads.items()},
                           (p_seg_box, image_features), repeats, device)
    rows = []
    for name, (head, flops) in heads.items():
        rows.append({"head": name, "params": sum(p.numel() for p in head.parameters()),
                     "mflops": flops / 1e6, "us_per_expr": 1e6 * seconds[name] / batch})
    mlp, attn = rows
    for r in rows:
        r["params_ratio"] = r["params"] / mlp["params"]
        r["time_ratio"] = r["us_per_expr"] / mlp["us_per_expr"]
    device_text = study.device if study is not None and device == "cpu" else device
    return Table(
        title=f"Box-head cost at the {preset} preset",
        columns=[Column("head", "head"), Column("params", "parameters"), Column("params_ratio", "\u00d7 MLP"),
                 Column("mflops", "MFLOPs / expr"), Column("us_per_expr", "\u00b5s / expr (median)"),
                 Column("time_ratio", "time \u00d7 MLP")],
        rows=rows,
        caption=(f"Heads built from ppcr.model.heads with the {preset} preset's sizes (LLM width {d}, {n_img} image "
                 f"tokens, attention head {cfg.attn_box_layers} layers \u00d7 width {cfg.attn_box_dim}); random "
                 f"weights; forward time of a batch of {batch} on {device} ({device_text}"
                 f"{', one thread' if device == 'cpu' else ''}), median of {repeats} interleaved runs, divided by "
                 f"{batch}. FLOPs counted analytically (2 \u00d7 multiply-adds of the linear layers and "
                 f"attention products). The paper states the MLP is much cheaper than the attention head at similar "
                 f"accuracy; the accuracy side is Table 3. Attention head: {attn['params'] / mlp['params']:.1f}\u00d7 "
                 f"the parameters, {attn['mflops'] / mlp['mflops']:.1f}\u00d7 the FLOPs, "
                 f"{attn['time_ratio']:.1f}\u00d7 the time."),
    )


def stage_costs(study: Study) -> Table:
    """Every training stage of the study: steps, wall time, throughput, peak memory, first/final total loss."""
    rows = []
    for s in study.index.get("stages", []):
        rows.append({"stage": s.get("stage"), "seed": s.get("seed"), "steps": s.get("steps"),
                     "wall_s": s.get("wall_s"), "samples_per_s": s.get("samples_per_s"),
                     "peak_memory_mb": s.get("peak_memory_mb"),
                     "loss_first": (s.get("first_losses") or {}).get("total"),
                     "loss_final": (s.get("final_losses") or {}).get("total")})
    return Table(
        title="Training stages of this run",
        columns=[Column("stage", "stage"), Column("seed", "seed"), Column("steps", "steps"),
                 Column("wall_s", "wall s"), Column("samples_per_s", "samples/s"),
                 Column("peak_memory_mb", "peak MB"), Column("loss_first", "first loss"),
                 Column("loss_final", "final loss")],
        rows=rows,
        caption=f"From the stages' DONE.json files; device {study.device}; {scale_text(study)}.",
    )
