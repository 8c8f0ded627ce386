"""Video Swin-B's window attention on this CPU, each way the `attention` setting offers, in each precision.

    python benchmarks/bench_attention.py --precision fp32,bf16 --json benchmarks/results/attention_cpu.json

torchvision's swin3d computes softmax(q k^T * scale + bias + mask) v with a matmul, two adds, a
softmax and a matmul, each pass over the (windows, heads, 392, 392) scores in memory ("reference").
"fused" is F.scaled_dot_product_attention with the same additive mask; "matmul" is two batched matmuls
per window with the softmax between (extractors/rgb_vst.py). This times each at the shapes of Swin-B's
stages 1-3 for one 32-frame segment at 224x224 and prints the largest difference from float64 of the
same inputs. Then the whole Video Swin-B extractor (random weights, one segment) with "fused" and "matmul", calls
taking turns: median time, speed against "fused" in the same precision, and the largest difference of the 1024-d features
from fp32 with "fused", relative to their largest value. bf16 runs where the CPU has it natively.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from extractors.base import WeightsSource  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.rgb_vst import VideoSwinExtractor, windowed_attention  # noqa: E402
from extractors.settings import settings_from_values  # noqa: E402
from pipeline.devices import native_bf16  # noqa: E402

# (stage, windows, heads) for a (16, 56, 56)-token first stage and 8x7x7 windows; 392 tokens, head dim 32
STAGES = (("stage 1", 128, 4), ("stage 2", 32, 8), ("stage 3", 8, 16))
TOKENS, HEAD_DIM = 392, 32
ATTENTIONS = ("reference", "fused", "matmul")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, repeats: int = 3) -> tuple[float, torch.Tensor]:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - started) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32,bf16",
                        help="comma-separated: fp32, bf16 (bf16 skipped without native support; default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    asked = args.precision.split(",")
    if any(p not in DTYPES for p in asked):
        parser.error(f"--precision: fp32 and/or bf16, got {args.precision!r}")
    # fp32 first: the features of every other run are compared with its
    precisions = [p for p in DTYPES if p in asked and (p == "fp32" or native_bf16(torch.device("cpu")))]
    if not precisions:
        parser.error("--precision bf16: this CPU has no native bf16")
    record = {**run_record(), "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv]),
              "precisions": precisions}
    print(f"{record['cpu']}, {record['threads']} threads, commit {record['commit']}, {record['date']}")
    record["stages"] = stages(precisions)
    record["whole_network"] = whole_network(precisions)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


def attention_ways(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> dict:
    """Each `attention` setting's computation of one clip's windows, as the extractor runs it."""
    def reference() -> torch.Tensor:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return (scores + mask).softmax(-1) @ v

    return {"reference": reference,
            "fused": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(*q.shape[:2], -1, -1)),
            "matmul": lambda: windowed_attention(q, k, v, mask)}


@torch.inference_mode()
def stages(precisions: list[str]) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for stage, windows, heads in STAGES:
        q, k, v = (torch.randn(windows, heads, TOKENS, HEAD_DIM) for _ in range(3))
        mask = torch.randn(1, heads, TOKENS, TOKENS)  # one bias for every window, as an unshifted block's
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double().expand(
            windows, -1, -1, -1))
        gflop = 4 * windows * heads * TOKENS * TOKENS * HEAD_DIM / 1e9
        for precision in precisions:
            inputs = [x.to(DTYPES[precision]) for x in (q, k, v, mask)]
            times = {}
            for attention, fn in attention_ways(*inputs).items():
                seconds, out = timed(fn)
                difference = (out.double() - exact).abs().max().item()
                times[attention] = seconds
                rows.append({"stage": stage, "windows": windows, "heads": heads, "precision": precision,
                             "attention": attention, "seconds": seconds, "gflop_per_s": gflop / seconds,
                             "largest_difference_from_float64": difference})
            print(f"{stage} ({windows} windows x {heads} heads) {precision}: " + ", ".join(
                f"{a} {s * 1e3:.0f} ms ({gflop / s:.0f} GFLOP/s)" for a, s in times.items())
                + f"; matmul {times['fused'] / times['matmul']:.2f}x fused")
    return rows


def whole_network(precisions: list[str], repeats: int = 3) -> list[dict]:
    """The extractor on one segment with each attention and precision, the same random weights; the
    attentions of one precision take turns call by call (a load that comes and goes hits them alike), and
    each is timed by its median call."""
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 32, 256, 455, 3), dtype=np.uint8))
    state, expected, rows = None, None, []
    for precision in precisions:
        extractors = {}
        for attention in ("fused", "matmul"):  # the reference is timed per stage: 2-3x slower, it adds only noise here
            config = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random",
                                      arch_size="full", precision=precision,
                                      settings={"rgb": settings_from_values("rgb", "vst", {"attention": attention})})
            extractor = VideoSwinExtractor(config, torch.device("cpu"), WeightsSource())
            if state is None:
                state = {name: value.clone() for name, value in extractor.model.state_dict().items()}
            extractor.model.load_state_dict(state)
            extractors[attention] = extractor
        features = {attention: extractor.embed(frames) for attention, extractor in extractors.items()}  # warm-up
        times: dict[str, list[float]] = {attention: [] for attention in extractors}
        for _ in range(repeats):
            for attention, extractor in extractors.items():
                started = time.perf_counter()
                extractor.embed(frames)
                times[attention].append(time.perf_counter() - started)
        expected = features["fused"] if expected is None else expected  # the first precision's fused attention
        fused_s = float(np.median(times["fused"]))
        for attention, extractor in extractors.items():
            seconds = float(np.median(times[attention]))
            relative = ((features[attention] - expected).abs().max() / expected.abs().max()).item()
            # what the blocks keep between calls (FusedWindowAttention3d.attention_mask)
            masks = [m.__dict__["_cached_mask"][1] for m in extractor.model.modules() if "_cached_mask" in m.__dict__]
            mask_mib = sum(mask.numel() * mask.element_size() for mask in masks) / 2**20
            rows.append({"precision": precision, "attention": attention, "seconds": seconds, "times": times[attention],
                         "speedup_over_fused": fused_s / seconds,
                         f"relative_difference_from_{precisions[0]}_fused": relative, "cached_mask_mib": mask_mib})
            print(f"Video Swin-B, one 32-frame segment, {precision}, attention {attention}: {seconds:.2f} s "
                  f"({fused_s / seconds:.2f}x fused); largest feature difference from {precisions[0]} fused "
                  f"{relative:.1e} of the largest feature; blocks keep {mask_mib:.0f} MiB of masks")
        del extractors, features
    return rows


if __name__ == "__main__":
    main()
