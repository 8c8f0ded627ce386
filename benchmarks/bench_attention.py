"""Video Swin-B's window attention on this CPU: as torchvision writes it vs torch's fused kernel.

    python benchmarks/bench_attention.py --json benchmarks/results/attention_cpu.json

torchvision's swin3d computes softmax(q k^T * scale + bias + mask) v with a matmul, two adds, a
softmax and a matmul, each pass over the (windows, heads, 392, 392) scores in memory. This times that
against F.scaled_dot_product_attention with the same additive mask, at the shapes of Swin-B's stages
1-3 for one 32-frame segment at 224x224, and prints the largest difference of the outputs. Then the
whole Video Swin-B (random weights) on one segment, with torchvision's attention and with the fused
FusedWindowAttention3d the extractor uses by default (extractors/rgb_vst.py): time of each, the
ratio, and the largest difference of the 1024-d features relative to their scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from extractors.rgb_vst import fuse_window_attention  # noqa: E402

# (stage, windows, heads) for a (16, 56, 56)-token first stage and 8x7x7 windows; 392 tokens, head dim 32
STAGES = (("stage 1", 128, 4), ("stage 2", 32, 8), ("stage 3", 8, 16))
TOKENS, HEAD_DIM = 392, 32


def timed(fn, repeats: int = 3) -> tuple[float, torch.Tensor]:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - started) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    record = {**run_record(), "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv])}
    print(f"{record['cpu']}, {record['threads']} threads, commit {record['commit']}, {record['date']}")
    record["stages"] = stages()
    record["whole_network"] = whole_network()
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


@torch.inference_mode()
def stages() -> list[dict[str, float | str]]:
    torch.manual_seed(0)
    rows = []
    for stage, windows, heads in STAGES:
        q, k, v = (torch.randn(windows, heads, TOKENS, HEAD_DIM) for _ in range(3))
        mask = torch.randn(heads, TOKENS, TOKENS)[None] + torch.zeros(windows, 1, TOKENS, TOKENS)

        def as_written() -> torch.Tensor:
            scores = (q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)
            return (scores + mask).softmax(-1) @ v

        def fused() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        written_s, written = timed(as_written)
        fused_s, out = timed(fused)
        difference = (written - out).abs().max().item()
        print(f"{stage}: {windows} windows x {heads} heads: as written {written_s * 1e3:.0f} ms, fused "
              f"{fused_s * 1e3:.0f} ms ({written_s / fused_s:.2f}x), largest difference {difference:.1e}")
        rows.append({"stage": stage, "windows": windows, "heads": heads, "as_written_s": written_s, "fused_s": fused_s,
                     "speedup": written_s / fused_s, "largest_difference": difference})
    return rows


def whole_network(repeats: int = 2) -> dict[str, float]:
    from torchvision.models.video import swin3d_b

    # Built outside inference mode, as the extractor builds it: a fused block keys its kept mask on its
    # weights' version counter, which inference tensors do not have.
    torch.manual_seed(0)
    reference = swin3d_b().eval()
    fused = fuse_window_attention(swin3d_b().eval())
    fused.load_state_dict(reference.state_dict())
    reference.head = fused.head = torch.nn.Identity()
    segment = torch.randn(1, 3, 32, 224, 224)
    with torch.inference_mode():
        reference_s, expected = timed(lambda: reference(segment), repeats)
        fused_s, got = timed(lambda: fused(segment), repeats)
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    # what the fused blocks keep between calls (FusedWindowAttention3d.attention_mask)
    masks = [m.__dict__["_cached_mask"][1] for m in fused.modules() if "_cached_mask" in m.__dict__]
    mask_mib = sum(mask.numel() * mask.element_size() for mask in masks) / 2**20
    print(f"Video Swin-B, one 32-frame segment: torchvision attention {reference_s:.2f} s, fused {fused_s:.2f} s "
          f"({reference_s / fused_s:.2f}x); largest feature difference {relative:.1e} of the largest feature; "
          f"{len(masks)} blocks keep {mask_mib:.0f} MiB of attention masks")
    return {"torchvision_attention_s": reference_s, "fused_s": fused_s, "speedup": reference_s / fused_s,
            "relative_difference": relative, "cached_masks": len(masks), "cached_mask_mib": mask_mib}


if __name__ == "__main__":
    main()
