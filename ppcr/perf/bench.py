"""`ppcr bench`: evaluation throughput, batch-1 latency, one training step, and the compute-bound ceiling.

Random weights (the compute does not depend on the values). The workload is RefCOCO-like: `--images` images of
480x640, `--expressions-per-image` expressions each, 3-20 words drawn from a fixed word list. Evaluation runs the
model's own batched path (`PPCRModel.run_steps` + `SamSegmenter.postprocess`, as `predict` does) under
`torch.inference_mode`, with each image's CLIP and SAM encodings computed once and kept only while a batch still
needs them. Image preprocessing (PIL resize, normalisation) is done beforehand and not timed.

The ceiling: a large square matmul is timed for each dtype the model runs in (the MLLM's, and float32 for SAM and the
heads); `ppcr.perf.flops` counts each stage's FLOPs; the compute-bound throughput is one expression's FLOPs over those
rates, stage by stage; achieved / bound is the measured throughput over it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers

from ppcr.perf import flops
from ppcr.model.config import PRESETS, VARIANTS, PPCRConfig, preset_config
from ppcr.model.mllm import torch_dtype
from ppcr.model.modeling_ppcr import PPCRModel

IMAGE_HW = (480, 640)  # a typical COCO image
MIN_WORDS, MAX_WORDS = 3, 20
IMAGE_ENCODE_BATCH = 4  # images per CLIP / SAM encoder call (bounds SAM ViT-H's attention memory)
WORDS = (
    "man", "woman", "person", "guy", "girl", "boy", "kid", "lady", "player", "dog", "cat", "horse", "elephant",
    "giraffe", "zebra", "car", "bus", "truck", "bike", "umbrella", "chair", "table", "bed", "couch", "bowl", "cup",
    "plate", "pizza", "sandwich", "cake", "bottle", "glass", "shirt", "jacket", "hat", "left", "right", "middle",
    "center", "top", "bottom", "front", "back", "near", "far", "closest", "second", "first", "last", "red", "blue",
    "green", "white", "black", "yellow", "brown", "striped", "big", "small", "tall", "short", "the", "a", "in", "on",
    "with", "of", "to", "behind", "next", "holding", "wearing", "sitting", "standing", "half", "partial", "corner",
)


# ---------------------------------------------------------------------------------------------------------------
# devices and timing
# ---------------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of `fn()`, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, Any]:
    """FLOP/s of an (n x n) @ (n x n) product: median of `repeats` timed runs after warm-up, random inputs (two
    input sets, alternated, so a cache never holds the operands of the next run)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    sets = [(torch.randn(n, n, generator=gen).to(device, dtype), torch.randn(n, n, generator=gen).to(device, dtype))
            for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    for a, b in sets * 2:
        torch.matmul(a, b, out=out)
    times = []
    for i in range(repeats):
        a, b = sets[i % 2]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(lambda: torch.matmul(a, b, out=out), device))
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("matmul produced non-finite values")
    median = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "median_s": median,
            "flops_per_s": 2 * n**3 / median, "times_s": times}


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "kind": "torch.cuda.max_memory_allocated since reset before the timed steps"}
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kind": "process peak RSS (ru_maxrss), whole run so far: CPU only"}


# ---------------------------------------------------------------------------------------------------------------
# the workload
# ---------------------------------------------------------------------------------------------------------------
def make_expressions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(MIN_WORDS, MAX_WORDS))) for _ in range(n)]


@dataclass
class Workload:
    """Prepared inputs on the CPU: per image the CLIP and SAM tensors; the expressions sorted by image."""

    clip: torch.Tensor  # (N, 3, S, S)
    sam: torch.Tensor  # (N, 3, S', S')
    sam_input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    items: list[tuple[int, str]]  # (image index, expression), grouped by image

    @property
    def num_images(self) -> int:
        return self.clip.shape[0]

    def subset(self, n_expressions: int) -> "Workload":
        """The first `n_expressions` expressions and the images they are on."""
        items = self.items[:n_expressions]
        n_img = max(i for i, _ in items) + 1
        return Workload(self.clip[:n_img], self.sam[:n_img], self.sam_input_sizes[:n_img],
                        self.original_sizes[:n_img], items)


def make_workload(model: PPCRModel, images: int, per_image: int, seed: int = 0) -> Workload:
    prep = model.image_prep()
    rs = np.random.RandomState(seed)
    arrays = [rs.randint(0, 256, (*IMAGE_HW, 3), dtype=np.uint8) for _ in range(images)]
    sam = [prep.sam(a) for a in arrays]
    expressions = make_expressions(images * per_image, seed)
    items = [(i, expressions[i * per_image + j]) for i in range(images) for j in range(per_image)]
    return Workload(torch.stack([prep.clip(a) for a in arrays]), torch.stack([s[0] for s in sam]),
                    [s[1] for s in sam], [a.shape[:2] for a in arrays], items)


def evaluate_workload(model: PPCRModel, work: Workload, batch_size: int,
                      keep: bool = False) -> list[dict[str, Any]]:
    """The evaluation path in batches of `batch_size` expressions: each image is encoded (CLIP + SAM) once, when the
    first batch that needs it starts, and dropped after the last one. Returns masks / boxes when `keep`."""
    device = model.device
    model.eval()
    encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(work.items), batch_size):
            chunk = work.items[start:start + batch_size]
            needed = sorted({i for i, _ in chunk})
            for i in list(encoded):
                if i not in needed:
                    del encoded[i]
            new = [i for i in needed if i not in encoded]
            for k in range(0, len(new), IMAGE_ENCODE_BATCH):
                part = new[k:k + IMAGE_ENCODE_BATCH]
                feats = model.mllm.image_features(work.clip[part].to(device))
                embs = model.segmenter.encode_images(work.sam[part].to(device))
                for j, i in enumerate(part):
                    encoded[i] = (feats[j], embs[j])
            slot = {i: k for k, i in enumerate(needed)}
            feats = torch.stack([encoded[i][0] for i in needed])
            embs = torch.stack([encoded[i][1] for i in needed])
            index = torch.tensor([slot[i] for i, _ in chunk], device=device)
            sizes = [work.original_sizes[i] for i, _ in chunk]
            gt = None
            if model.config.spec.eval_box == "gt":  # the oracle: a fixed box (the image's central quarter)
                gt = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4] for h, w in sizes], device=device)
            st = model.run_steps(feats, embs, index, [e for _, e in chunk], sizes, gt_boxes=gt)
            masks = model.segmenter.postprocess(st.low_res_masks, [work.sam_input_sizes[i] for i, _ in chunk],
                                                sizes)
            binary = [m > 0 for m in masks]
            if keep:
                for j, (i, expr) in enumerate(chunk):
                    results.append({"image_index": i, "expression": expr, "mask": binary[j].cpu().numpy(),
                                    "box": None if st.sam_boxes is None else st.sam_boxes[j].cpu().numpy(),
                                    "score": float(st.iou_pred[j, 0])})
    return results


def padded_tokens(lengths: list[int], batch_size: int) -> float:
    """Mean tokens per expression the LLM computes when batches of `batch_size` are right-padded to their longest."""
    total = sum(max(lengths[s:s + batch_size]) * len(lengths[s:s + batch_size])
                for s in range(0, len(lengths), batch_size))
    return total / len(lengths)


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------
PATHS = {"prefix_cache": True, "no_prefix_cache": False}  # evaluation paths timed side by side


def bench_throughput(model: PPCRModel, work: Workload, batch_sizes: list[int], repeats: int,
                     paths: dict[str, bool] = PATHS) -> dict[str, list[dict[str, Any]]]:
    """Expressions/s of each evaluation path (`model.prefix_cache` on / off) per batch size. The paths' timed
    repeats alternate, so a slow spell of a shared machine hits both alike and their ratio stays meaningful."""
    device = model.device
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for b in batch_sizes:
        times: dict[str, list[float]] = {name: [] for name in paths}
        for name, on in paths.items():  # warm-up
            model.prefix_cache = on
            evaluate_workload(model, work.subset(min(len(work.items), 2 * b)), b)
        for _ in range(repeats):
            for name, on in paths.items():
                model.prefix_cache = on
                times[name].append(timed(lambda: evaluate_workload(model, work, b), device))
        for name in paths:
            median = statistics.median(times[name])
            rows[name].append({"batch_size": b, "expressions": len(work.items), "images": work.num_images,
                               "times_s": times[name], "median_s": median,
                               "expressions_per_s": len(work.items) / median})
        print(f"  eval batch {b:>4}: " + ", ".join(f"{n} {r[-1]['expressions_per_s']:.2f} expr/s"
                                                    for n, r in rows.items()), file=sys.stderr, flush=True)
    model.prefix_cache = True
    return rows


def bench_latency(model: PPCRModel, work: Workload, repeats: int) -> dict[str, Any]:
    """One image with one expression, end to end (CLIP + SAM encodings, both passes, decoder, masks)."""
    device = model.device
    singles = [Workload(work.clip[i:i + 1], work.sam[i:i + 1], work.sam_input_sizes[i:i + 1],
                        work.original_sizes[i:i + 1], [(0, e)])
               for i, e in (work.items[k % len(work.items)] for k in range(max(repeats, 1) + 1))]
    evaluate_workload(model, singles[0], 1)  # warm-up
    times = [timed(lambda w=w: evaluate_workload(model, w, 1), device) for w in singles[1:]]
    return {"batch_size": 1, "includes_image_encoding": True, "times_s": times,
            "median_ms": 1e3 * statistics.median(times)}


def train_batch(model: PPCRModel, work: Workload, size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A collated batch of `size` expressions (grouped by image as the workload is) with random box targets, and
    the SAM embedding cache the project's training uses."""
    items = [work.items[k % len(work.items)] for k in range(size)]
    rs = np.random.RandomState(1)
    masks, boxes = [], []
    for i, _ in items:
        h, w = work.original_sizes[i]
        x1, y1 = int(rs.randint(0, w // 2)), int(rs.randint(0, h // 2))
        x2, y2 = x1 + int(rs.randint(8, w // 2)), y1 + int(rs.randint(8, h // 2))
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[y1:y2, x1:x2] = 1
        masks.append(m)
        boxes.append(torch.tensor([x1, y1, x2, y2], dtype=torch.float32))
    idx = [i for i, _ in items]
    batch = {
        "clip_pixel_values": work.clip[idx], "sam_pixel_values": work.sam[idx],
        "sam_input_size": [work.sam_input_sizes[i] for i in idx],
        "original_size": [work.original_sizes[i] for i in idx],
        "image_key": [f"img{i}" for i in idx], "expression": [e for _, e in items], "mask": masks, "box": boxes,
    }
    cache = {f"img{i}": model.segmenter.encode_images(work.sam[i:i + 1].to(model.device))[0]
             for i in sorted(set(idx))}  # encode_images runs without grad
    return batch, cache


def bench_train_step(model: PPCRModel, work: Workload, size: int, repeats: int) -> dict[str, Any]:
    """Forward, backward and an AdamW step over the trainable parameters (LoRA A and B, new token rows, heads,
    SAM's prompt encoder and mask decoder), SAM embeddings cached; median over `repeats` steps after one warm-up."""
    device = model.device
    batch, cache = train_batch(model, work, size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step(seed: int) -> float:
        out = model(batch, rng=random.Random(seed), sam_cache=cache)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step(0)  # warm-up (creates the optimizer state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    times = [timed(lambda s=s: losses.append(step(s)), device) for s in range(1, repeats + 1)]
    model.eval()
    del optimizer
    return {"micro_batch": size, "sam_embeddings_cached": True, "gradient_checkpointing":
            model.config.gradient_checkpointing, "dtype": model.config.dtype, "times_s": times,
            "median_s": statistics.median(times), "expressions_per_s": size / statistics.median(times),
            "losses": losses, "trainable_parameters": sum(p.numel() for p in params), **peak_memory(device)}


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["glamm", "ppcr"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--images", type=int, default=None,
                        help="images in the workload (default: enough for two batches of the largest size)")
    parser.add_argument("--expressions-per-image", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--train-batch", type=int, default=8, help="training micro-batch (expressions)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the MLLM's dtype (default: the preset's; SAM and the heads stay float32)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 matmuls (SAM, the heads) use TF32 tensor cores (changes numerics slightly)")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the timed square matmul")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None,
                        help="JSON path, or a folder for <device>-<preset>.json (default results/bench/)")


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            done = subprocess.run(["git", *a], capture_output=True, text=True, check=False,
                                  cwd=Path(__file__).parent)
        except OSError:  # no git
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:  # a copy of the tree without .git (e.g. on a lent GPU machine): the caller may name it
        return {"commit": os.environ.get("PPCR_GIT_COMMIT") or None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from the parsed arguments (whether it came from the console or `cli.main([...])`)."""
    parts = ["ppcr", "bench", "--preset", args.preset, "--variants", *args.variants, "--device", args.device,
             "--batch-sizes", *map(str, args.batch_sizes), "--expressions-per-image", str(args.expressions_per_image),
             "--repeats", str(args.repeats), "--train-batch", str(args.train_batch)]
    for flag, value in (("--images", args.images), ("--dtype", args.dtype), ("--matmul-size", args.matmul_size),
                        ("--threads", args.threads), ("--out", args.out)):
        if value is not None:
            parts += [flag, str(value)]
    for flag in ("no_train", "tf32"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    return " ".join(shlex.quote(p) for p in parts)


def versions() -> dict[str, str | None]:

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cuda": torch.version.cuda, "cudnn":
            str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None}


def build_model(cfg: PPCRConfig, device: torch.device) -> PPCRModel:
    """Random weights, created directly on the device (a 7B model never passes through host memory as float32)."""
    with device:
        model = PPCRModel.build(cfg, extra_words=WORDS)
    return model.to(device).eval()


def structure_key(variant: str) -> str:
    """Variants with the same modules share one built model (only `config.variant` differs)."""
    return VARIANTS[variant].box_head


def measure_variant(model: PPCRModel, args: argparse.Namespace, images: int,
                    rates: dict[str, float]) -> dict[str, Any]:
    """Every measurement of one variant (`model.config.variant`), with its FLOP count and compute bound."""
    cfg = model.config
    per_image = args.expressions_per_image
    work = make_workload(model, images, per_image)
    expressions = [e for _, e in work.items]
    len1, len2 = flops.pass_lengths(cfg, model.tokenizer, expressions)
    prefixes = flops.pass_prefix_lengths(cfg, model.tokenizer, expressions)
    ev = {"prefix_cache": flops.evaluation_flops(cfg, len1, len2, per_image, prefixes),
          "no_prefix_cache": flops.evaluation_flops(cfg, len1, len2, per_image)}
    print(f"[{cfg.variant}] GFLOP per expression: " + ", ".join(f"{n} {e.total / 1e9:.4g}" for n, e in ev.items()),
          file=sys.stderr, flush=True)
    by_path = bench_throughput(model, work, args.batch_sizes, args.repeats)
    entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                             "prefix_tokens": {"pass1": prefixes[0], "pass2": prefixes[1]}}
    for name, rows in by_path.items():
        for row in rows:
            b = row["batch_size"]
            full = padded_tokens(len1, b) + (padded_tokens(len2, b) if len2 else 0)
            cached = full - (prefixes[0] + (prefixes[1] if len2 else 0)) * (1 - 1 / per_image)
            row["llm_tokens_padded_per_expression"] = cached if name == "prefix_cache" else full
        best = max(rows, key=lambda r: r["expressions_per_s"])
        bound_s = ev[name].bound_seconds(rates, cfg.dtype)
        entry[name] = {
            "flops": ev[name].to_dict(),
            "eval": {"by_batch_size": rows, "best": best},
            "bound": {"expressions_per_s": 1 / bound_s, "seconds_per_expression": bound_s,
                      "rates_flops_per_s": rates,
                      "stage_dtypes": {s: ev[name].stage_dtype(s, cfg.dtype) for s in flops.STAGES},
                      "achieved_ratio": best["expressions_per_s"] * bound_s},
        }
    entry["prefix_cache_speedup"] = {
        "by_batch_size": {str(a["batch_size"]): a["expressions_per_s"] / b["expressions_per_s"]
                          for a, b in zip(by_path["prefix_cache"], by_path["no_prefix_cache"])},
        "flops_ratio": ev["no_prefix_cache"].total / ev["prefix_cache"].total}
    entry["latency_batch1"] = bench_latency(model, work, args.repeats)
    entry["train"] = None
    if not args.no_train:
        train = bench_train_step(model, work, args.train_batch, args.repeats)
        answer_tokens = 7.0  # per pass ("Sure, it is [SEG]." + </s>), for the rough estimate below
        vocab = model.mllm.llava.config.text_config.vocab_size
        estimate = flops.training_step_flops(ev["no_prefix_cache"], cfg, answer_tokens, vocab)  # training: no cache
        train["flops_estimate_per_expression"] = estimate
        train["achieved_flops_per_s"] = estimate["total"] * train["expressions_per_s"]
        entry["train"] = train
    return entry


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = preset_config(args.preset)
    if args.dtype:
        base = base.replace(dtype=args.dtype)
    if device.type == "cpu" and args.preset == "paper":
        print("warning: the paper preset on a CPU builds a 7B model in host memory", file=sys.stderr)
    per_image = args.expressions_per_image
    images = args.images or max(2, math.ceil(2 * max(args.batch_sizes) / per_image))
    name = device_name(device)
    device_slug = slug(name if device.type == "cuda" else "cpu " + name.split(" (")[0])
    out_path = Path(args.out or "results/bench/")
    if args.out is None or args.out.endswith("/") or out_path.is_dir():
        out_path = out_path / f"{device_slug}-{args.preset}.json"

    mllm_dtype = base.dtype
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    mm_repeats = 50 if device.type == "cuda" else 10
    rates = {dt: matmul_rate(device, torch_dtype(dt), n, mm_repeats) for dt in dict.fromkeys([mllm_dtype, "float32"])}
    for dt, r in rates.items():
        print(f"matmul {dt} n={n}: {r['flops_per_s'] / 1e12:.3f} TFLOP/s", file=sys.stderr, flush=True)
    rate_values = {dt: r["flops_per_s"] for dt, r in rates.items()}

    report: dict[str, Any] = {
        "schema": 2,
        "label": "GPU" if device.type == "cuda" else "CPU",
        "device": {"type": device.type, "name": name, "threads": torch.get_num_threads(),
                   "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)},
        "versions": versions(),
        "git": git_commit(),
        "command": command_line(args),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"preset": args.preset, "variants": args.variants, "batch_sizes": args.batch_sizes,
                     "images": images, "expressions_per_image": per_image, "expression_words": [MIN_WORDS, MAX_WORDS],
                     "image_hw": list(IMAGE_HW), "repeats": args.repeats, "train_batch": args.train_batch,
                     "train": not args.no_train, "mllm_dtype": mllm_dtype, "sam_dtype": "float32",
                     "attn_implementation": base.attn_implementation, "image_encode_batch": IMAGE_ENCODE_BATCH,
                     "weights": "random", "preprocessing_timed": False, "grad_mode": "torch.inference_mode"},
        "matmul": rates,
        "variants": {},
    }

    model: PPCRModel | None = None
    built_key = None
    for variant in args.variants:
        cfg = base.replace(variant=variant)
        if model is None or structure_key(variant) != built_key:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"building {args.preset} ({variant}) on {device} ...", file=sys.stderr, flush=True)
            model, built_key = build_model(cfg, device), structure_key(variant)
        model.config = cfg  # same modules; run_steps reads the variant from here
        report["variants"][variant] = measure_variant(model, args, images, rate_values)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out_path}")
    return 0


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"ppcr bench: preset {s['preset']}, {report['label']} {report['device']['name']}, "
             f"MLLM {s['mllm_dtype']}, SAM float32, random weights, {s['expressions_per_image']} expressions per image",
             "matmul rate: " + ", ".join(f"{dt} {r['flops_per_s'] / 1e12:.3f} TFLOP/s (n={r['n']})"
                                         for dt, r in report["matmul"].items()),
             ""]
    head = (f"{'variant':<14} {'path':<16} {'batch':>5} {'expr/s':>10} {'ms/expr':>9} {'GFLOP/expr':>11} "
            f"{'bound expr/s':>13} {'achieved':>9}")
    lines += [head, "-" * len(head)]
    for variant, e in report["variants"].items():
        for path in PATHS:
            p = e[path]
            gflop = p["flops"]["total_per_expression"] / 1e9
            bound = p["bound"]["expressions_per_s"]
            for row in p["eval"]["by_batch_size"]:
                star = "*" if row["batch_size"] == p["eval"]["best"]["batch_size"] else " "
                lines.append(f"{variant:<14} {path:<16} {row['batch_size']:>4}{star} {row['expressions_per_s']:>10.2f} "
                             f"{1e3 / row['expressions_per_s']:>9.2f} {gflop:>11.4g} {bound:>13.2f} "
                             f"{row['expressions_per_s'] / bound:>9.1%}")
    lines += ["", "* best batch size of the path; achieved = measured / compute-bound throughput", "",
              "prefix cache: measured speed-up (expr/s with / without, same run, interleaved repeats) and FLOP ratio"]
    for variant, e in report["variants"].items():
        sp = e["prefix_cache_speedup"]
        by_b = ", ".join(f"batch {b}: {r:.2f}x" for b, r in sp["by_batch_size"].items())
        lines.append(f"  {variant}: {by_b}; FLOPs {sp['flops_ratio']:.2f}x fewer "
                     f"(prefix {e['prefix_tokens']['pass1']} / {e['prefix_tokens']['pass2']} tokens)")
    lines += [""]
    head2 = f"{'variant':<14} {'latency b1 ms':>14} {'train step s':>13} {'train expr/s':>13} {'peak MiB':>9}"
    lines += [head2, "-" * len(head2)]
    for variant, e in report["variants"].items():
        t = e["train"]
        train = (f"{t['median_s']:>13.3f} {t['expressions_per_s']:>13.2f} {t['peak_mib']:>9.0f}" if t
                 else f"{'-':>13} {'-':>13} {'-':>9}")
        lines.append(f"{variant:<14} {e['latency_batch1']['median_ms']:>14.2f} {train}")
    lines += ["", "FLOPs per expression by stage (GFLOP, with the prefix cache):"]
    for variant, e in report["variants"].items():
        parts = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in e["prefix_cache"]["flops"]["per_expression"].items() if v)
        lines.append(f"  {variant}: {parts}")
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m ppcr.perf.bench ...` needs none of the other sub-commands' dependencies
    _parser = argparse.ArgumentParser(prog="ppcr bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
