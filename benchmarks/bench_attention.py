"""Video Swin-B's window attention on this CPU: as torchvision writes it vs torch's fused kernel.

    python benchmarks/bench_attention.py

torchvision's swin3d computes softmax(q k^T * scale + bias + mask) v with a matmul, two adds, a
softmax and a matmul, each pass over the (windows, heads, 392, 392) scores in memory. This times that
against F.scaled_dot_product_attention with the same additive mask, at the shapes of Swin-B's stages
1-3 for one 32-frame segment at 224x224, and prints the largest difference of the outputs. Then the
whole Video Swin-B (random weights) on one segment, with torchvision's attention and with the fused
FusedWindowAttention3d the extractor uses by default (extractors/rgb_vst.py): time of each, the
ratio, and the largest difference of the 1024-d features relative to their scale.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import git_commit  # noqa: E402
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


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, commit {git_commit()}")
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
        print(f"{stage}: {windows} windows x {heads} heads: as written {written_s * 1e3:.0f} ms, fused "
              f"{fused_s * 1e3:.0f} ms ({written_s / fused_s:.2f}x), largest difference {(written - out).abs().max():.1e}")

    whole_network()


@torch.inference_mode()
def whole_network(repeats: int = 2) -> None:
    from torchvision.models.video import swin3d_b

    torch.manual_seed(0)
    reference = swin3d_b().eval()
    fused = fuse_window_attention(swin3d_b().eval())
    fused.load_state_dict(reference.state_dict())
    reference.head = fused.head = torch.nn.Identity()
    segment = torch.randn(1, 3, 32, 224, 224)
    reference_s, expected = timed(lambda: reference(segment), repeats)
    fused_s, got = timed(lambda: fused(segment), repeats)
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"Video Swin-B, one 32-frame segment: torchvision attention {reference_s:.2f} s, fused {fused_s:.2f} s "
          f"({reference_s / fused_s:.2f}x); largest feature difference {relative:.1e} of the largest feature")


if __name__ == "__main__":
    main()
