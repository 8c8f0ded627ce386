"""Training-speed benchmark: one epoch's wall time and peak memory at the RG setting.

    python benchmarks/bench_train.py                      # CPU, and CUDA when visible
    python benchmarks/bench_train.py --batches 2 --device cpu --json bench.json
    python benchmarks/bench_train.py --models mcmoe --device cpu --precision bf16   # bf16 against the fp32 loop

RG setting: 68 segments, synthetic features of the real shapes (rgb 1024, flow 1024, audio 768), each
model's own batch size (MCMoE 32, LIMSSR 8), every step a forward, loss, backward and optimiser update
with per-sample training masks.
Each (model, variant, device) runs in its own process so its peak memory is its own: CUDA reports
torch's peak allocation, CPU the process's peak resident set (which includes ~0.3-0.5 GiB of torch
itself; `rss_before_mib` is the resident set after setup, before the first step).

MCMoE is timed twice: the model as written (modalities stacked for the STEM, every (expert, modality)
pair in one grouped convolution per layer, generators attending from one query step without projecting their context) and
a straightforward per-modality loop over the same parameters (the structure of the published code: one
STEM call per modality, M x M expert calls, full-length generator queries; tests/reference_mcmoe.py,
which the tests check the model against). Before timing, both are run once on the same batch and must
give the same score, loss, gradients and running statistics.

Every row also counts one step's floating-point operations and computing operators (`count_step`).
Where arithmetic bounds a step (a CPU), the GFLOP ratio caps the speed-up; where dispatch and kernel
launches do (a GPU at these sizes), the operator ratio is the better guide. Both are counts, not timings.
A grouped convolution's weight gradient is counted as the work done (`grouped_conv_backward_flop`;
torch's formula counts it `groups` times over).
Each row's arithmetic rate (GFLOP per step over the median step) is reported as a fraction of this
machine's ceilings, measured in the same process right after the epoch: the best fp32 and the best
bf16 matmul rate at the backbones' shapes (`bench_extract.matmul_rates`; bf16 only where the device
computes it natively, `pipeline.devices.native_bf16`). The paired run measures both ceilings between
its rounds as well, so its `paired_fraction` / `paired_bf16_fraction` (medians over rounds) hold up on
a shared machine.

--precision (default fp32) is the arithmetic of every step but the reference's: bf16 runs the forward
pass under torch.autocast and the loss in float32, as `pipeline train --precision bf16` does
(`pipeline.stages.train.forward_and_loss`). The "loop" variant is the reference code and always runs in fp32,
so with --precision bf16 the paired speed-up of "batched" is bf16 against the fp32 reference.

"mcmoe-adam" times the batched MCMoE step with each implementation of Adam's update
(`pipeline.stages.train.OPTIMIZER_IMPLEMENTATIONS`), and the update alone, paired the same way
(`time_adam_alone`); its check trains a few steps with each and compares the weights with torch's
default (bit-identical for foreach, float rounding for fused). "mcmoe-dropout" times it with each way
of drawing the dropout masks (`pipeline.stages.train.DROPOUT_MASKS`); its check compares the fraction of
elements each keeps. Every MCMoE step draws its masks as `pipeline train` does by default.

On a machine shared with other work single epochs swing by several times, so the speed-up comes from
a separate paired run: the variants take turns step by step in one process on the same batches, and
the median per-step time ratio is reported. Epoch time and peak memory come from each variant's own
process (the fastest of --repeats epochs).

LIMSSR (its `project` variant, the one the recorded figures measured) is timed with gradient
checkpointing on and off, over the tiny random Qwen2 of the tests on a
CPU and over a random-weight LLM of Qwen2.5-0.5B's sizes in bfloat16 on a GPU (no pretrained weights are
needed: speed and memory depend on the shapes only). Before timing, both variants must give the same
score, loss and gradients. Its rows also report the LLM sequence length (prompt + M * (T + 2) + K), the
trainable parameters and the size of what a run saves against the size of the base LLM.

Each model has one section below: a `setup_<model>(variant, ...)` that returns one training step, its
batches, its parameter count and optionally a dict of facts to report, an optional equivalence check, and
an entry in BENCHES; the driver at the bottom knows nothing model-specific.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.limssr import LIMSSR, LIMSSRConfig  # noqa: E402
from benchmarks.bench_extract import matmul_rates, run_record  # noqa: E402
from models.mcmoe import mcmoe  # noqa: E402
from models.tiny_llm import build_tiny_tokenizer, save_tiny_llm  # noqa: E402
from pipeline.data import draw_training_masks  # noqa: E402
from models.layers import use_uniform_dropout  # noqa: E402
from pipeline.devices import native_bf16  # noqa: E402
from pipeline.stages.train import build_optimizer, forward_and_loss  # noqa: E402
from pipeline.train_config import DROPOUT_MASKS, OPTIMIZER_IMPLEMENTATIONS, PRECISIONS, TrainConfig  # noqa: E402
from tests.reference_mcmoe import check_mcmoe_loop_matches, mcmoe_loop_forward  # noqa: E402

RG_DIMS = {"rgb": 1024, "flow": 1024, "audio": 768}
RG_CLIPS = 68


def incomplete_masks(batch: int, modalities: int, generator: torch.Generator) -> torch.Tensor:
    """One non-empty proper subset of the modalities per sample (the default training policy)."""
    codes = torch.randint(1, 2**modalities - 1, (batch,), generator=generator)
    return (codes.unsqueeze(1) >> torch.arange(modalities)) & 1 == 1


def synthetic_batches(dims: dict[str, int], batches: int, batch_size: int, clips: int, device: torch.device,
                      seed: int = 0) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        features = {m: torch.randn(batch_size, clips, c, generator=generator).to(device) for m, c in dims.items()}
        available = incomplete_masks(batch_size, len(dims), generator).to(device)
        target = torch.rand(batch_size, generator=generator).to(device)
        out.append((features, available, target))
    return out


class OperatorCounter(TorchDispatchMode):
    """Counts the operators that compute something (views, aliases and bare allocations left out).

    On a GPU each is at least one kernel launch plus the framework's dispatch on the CPU; with the
    small tensors of these models that overhead, not arithmetic, bounds a step, so the count is what
    batching lowers there. It is a device-independent proxy, not a timing.
    """

    METADATA_ONLY = {"aten._unsafe_view", "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func.overloadpacket) not in self.METADATA_ONLY:
            self.count += 1
        return func(*args, **(kwargs or {}))


_torch_conv_backward_flop = flop_registry[torch.ops.aten.convolution_backward]


def grouped_conv_backward_flop(*args: Any, out_val: Any = None) -> int:
    """torch's FLOP count of a convolution's backward, with the weight gradient of a grouped convolution
    divided by its groups: torch's formula counts it as if every input channel met every output
    channel, `groups` times the arithmetic done (MCMoE's experts are grouped convolutions)."""
    *head, groups, mask = args  # aten.convolution_backward's 11 arguments, as the dispatcher passes them
    inputs = _torch_conv_backward_flop(*head, groups, [mask[0], False, False], out_val=out_val)
    weights = _torch_conv_backward_flop(*head, groups, [False, mask[1], False], out_val=out_val)
    return inputs + weights // groups


# FlopCounterMode and profile_train's PartTimer read this registry
flop_registry[torch.ops.aten.convolution_backward] = grouped_conv_backward_flop


def count_step(step: Callable[[Any], float], batch: Any) -> dict[str, float]:
    """Floating-point operations and computing operators of one training step (forward, backward, update)."""
    with FlopCounterMode(display=False) as flops, OperatorCounter() as operators:
        step(batch)
    return {"gflop_per_step": flops.get_total_flops() / 1e9, "operators_per_step": operators.count}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM starts afresh at exec; ru_maxrss on Linux carries the parent's peak over into a child.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# =============================================================================== MCMoE


MCMOE_VARIANTS = ("batched", "loop")


def setup_mcmoe(variant: str, device: torch.device, batches: int, batch_size: int, clips: int, seed: int = 0,
                implementation: str = "torch-default", dropout_masks: str = TrainConfig.dropout_masks,
                precision: str = "fp32", **options: Any) -> tuple[Callable[[Any], float], list[Any], int]:
    """One MCMoE training step (forward, loss, backward, Adam) for `variant`, its batches, its size.
    The model as written runs at `precision`; the reference loop always in fp32."""
    torch.manual_seed(seed)
    model = mcmoe(list(RG_DIMS), RG_DIMS, position_encoding=True, **options).to(device).train()
    if dropout_masks == "uniform":
        use_uniform_dropout(model)
    data = synthetic_batches(RG_DIMS, batches, batch_size, clips, device, seed)
    optimizer = build_optimizer("adam", list(model.parameters()), 2e-4, 1e-4, implementation)
    if variant not in MCMOE_VARIANTS:
        raise ValueError(f"MCMoE variant must be one of {MCMOE_VARIANTS}, got {variant!r}")
    present = torch.ones(batch_size, len(RG_DIMS), dtype=torch.bool, device=device)

    def step(batch) -> float:
        features, available, target = batch
        if variant == "loop":
            total, _ = model.loss(mcmoe_loop_forward(model, features, available), target, present, available)
        else:
            _, total, _ = forward_and_loss(model, features, available, present, target, precision, device)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return float(total.detach())  # a trainer reads the loss every step; this also waits for the GPU

    step.model = model  # for check_mcmoe_adam
    return step, data, sum(p.numel() for p in model.parameters())


def setup_mcmoe_adam(variant: str, device: torch.device, batches: int, batch_size: int, clips: int, seed: int = 0,
                     **options: Any) -> tuple[Callable[[Any], float], list[Any], int]:
    """The batched MCMoE step with Adam's update done by implementation `variant`."""
    return setup_mcmoe("batched", device, batches, batch_size, clips, seed, implementation=variant, **options)


def check_mcmoe_adam(device: torch.device, batch_size: int, clips: int, steps: int = 3) -> dict[str, float]:
    """Train `steps` steps (dropout off) with every implementation; largest weight difference from torch's default."""
    weights = {}
    for variant in OPTIMIZER_IMPLEMENTATIONS:
        step, data, _ = setup_mcmoe_adam(variant, device, steps, batch_size, clips, seed=1, dropout=0.0)
        for batch in data:
            step(batch)
        weights[variant] = [p.detach().clone() for p in step.model.parameters()]
    reference = weights["torch-default"]
    diffs = {f"weights {v}": max((a - b).abs().max().item() for a, b in zip(weights[v], reference)) for v in weights}
    assert diffs["weights foreach"] == 0.0, f"foreach Adam differs from torch's default by {diffs['weights foreach']}"
    assert diffs["weights fused"] < 1e-3, f"fused Adam differs from torch's default by {diffs['weights fused']}"
    return diffs


def setup_mcmoe_dropout(variant: str, device: torch.device, batches: int, batch_size: int, clips: int, seed: int = 0,
                        **options: Any) -> tuple[Callable[[Any], float], list[Any], int]:
    """The batched MCMoE step with its dropout masks drawn the `variant` way."""
    return setup_mcmoe("batched", device, batches, batch_size, clips, seed, dropout_masks=variant, **options)


def check_mcmoe_dropout(device: torch.device, batch_size: int, clips: int) -> dict[str, float]:
    """The fraction of a (96, 68, 768) activation each way keeps, against 1 - p (p = MCMoE's 0.3)."""
    x = torch.ones(3 * batch_size, clips, 768, device=device)
    layers = {"bernoulli": torch.nn.Dropout(0.3), "uniform": use_uniform_dropout(torch.nn.Sequential(torch.nn.Dropout(0.3)))}
    kept = {f"kept {name}": (layer.train()(x) != 0).float().mean().item() for name, layer in layers.items()}
    assert all(abs(k - 0.7) < 0.01 for k in kept.values()), kept
    return kept


check_mcmoe_dropout.measures = "the same distribution: fraction of elements kept, 1 - p = 0.7:"


def time_adam_alone(device: torch.device, rounds: int = 20) -> dict[str, dict[str, float]]:
    """Adam's update alone over MCMoE's RG-size parameters (random gradients), each implementation in
    turn in one process as in `time_paired`: median milliseconds and speed-up over torch's default."""
    optimizers = {}
    for variant in OPTIMIZER_IMPLEMENTATIONS:
        torch.manual_seed(0)
        params = list(mcmoe(list(RG_DIMS), RG_DIMS, position_encoding=True).to(device).parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizers[variant] = build_optimizer("adam", params, 2e-4, 1e-4, variant)
    times: dict[str, list[float]] = {v: [] for v in OPTIMIZER_IMPLEMENTATIONS}
    for index in range(rounds + 1):
        turn = OPTIMIZER_IMPLEMENTATIONS[index % 3:] + OPTIMIZER_IMPLEMENTATIONS[:index % 3]
        for variant in turn:
            began = time.perf_counter()
            optimizers[variant].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index:
                times[variant].append(time.perf_counter() - began)
    base = times["torch-default"]
    return {v: {"optimizer_step_ms": 1000 * statistics.median(t),
                "optimizer_speedup": statistics.median(b / x for b, x in zip(base, t))} for v, t in times.items()}


def check_mcmoe(device: torch.device, batch_size: int, clips: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = mcmoe(list(RG_DIMS), RG_DIMS, position_encoding=True).to(device)
    features, available, target = synthetic_batches(RG_DIMS, 1, batch_size, clips, device, seed=1)[0]
    return check_mcmoe_loop_matches(model, features, available, target)


# =============================================================================== LIMSSR

# The LLM under LIMSSR per device. "qwen2.5-0.5b" has the shapes of Qwen/Qwen2.5-0.5B's config.json
# (hidden 896, 24 layers, 14 query and 2 key-value heads, SwiGLU width 4864, 151,936 embedding rows,
# tied embeddings) with random weights. The prompt goes through the tiny tokenizer, so its length may
# differ from Qwen's by a few tokens; the 3 x 70 modality positions dominate the sequence anyway.
LIMSSR_LLM_BY_DEVICE = {"cpu": "tiny", "cuda": "qwen2.5-0.5b"}
QWEN25_05B_SIZES = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                        max_position_embeddings=32768)
LIMSSR_VARIANTS = {"grad-ckpt": True, "plain": False}  # variant -> gradient checkpointing


def random_llm_folder(name: str, device: torch.device) -> Path:
    """A `--llm` folder of random weights, written once per machine (the children of one run share it)."""
    folder = Path(tempfile.gettempdir()) / "aqa-bench-llm" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=folder.parent))
    # The caller's random state must not depend on whether the folder was already there.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if name == "tiny":
            save_tiny_llm(staging)  # the default tiny config: hidden 64, 2 layers
        else:
            from transformers import Qwen2Config, Qwen2ForCausalLM

            tokenizer = build_tiny_tokenizer()
            config = Qwen2Config(**QWEN25_05B_SIZES, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(0)
            with torch.device(device):  # random init of half a billion weights is slow on a CPU
                model = Qwen2ForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            del model
    try:
        staging.rename(folder)
    except OSError:  # written meanwhile by another process: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_bench_limssr(variant: str, device: torch.device, dropout: float | None = None) -> LIMSSR:
    llm = LIMSSR_LLM_BY_DEVICE[device.type]
    options = {} if dropout is None else {"dropout": dropout, "lora_dropout": dropout}
    # the project variant: the one the recorded LIMSSR figures (benchmarks/results) measured
    config = LIMSSRConfig(
        modalities=list(RG_DIMS), feature_dims=dict(RG_DIMS), llm=str(random_llm_folder(llm, device)),
        variant="project", gradient_checkpointing=LIMSSR_VARIANTS[variant],
        torch_dtype="bfloat16" if device.type == "cuda" else "float32", **options,
    )
    return LIMSSR(config).to(device).train()


def any_subset_batches(batches: int, batch_size: int, clips: int, device: torch.device, seed: int = 0):
    """RG-shaped batches with LIMSSR's default masks: every non-empty subset, the full set included."""
    generator = torch.Generator().manual_seed(seed + 1)
    present = torch.ones(batch_size, len(RG_DIMS), dtype=torch.bool)
    return [(features, draw_training_masks(present, "any", generator).to(device), target)
            for features, _, target in synthetic_batches(RG_DIMS, batches, batch_size, clips, device, seed)]


def setup_limssr(variant: str, device: torch.device, batches: int, batch_size: int, clips: int,
                 seed: int = 0, precision: str = "fp32") -> tuple[Callable[[Any], float], list[Any], int, dict[str, Any]]:
    """One LIMSSR training step (forward, loss, backward, clipping, AdamW) as `pipeline train` runs it."""
    torch.manual_seed(seed)
    model = build_bench_limssr(variant, device)
    data = any_subset_batches(batches, batch_size, clips, device, seed)
    defaults = LIMSSRConfig.training_defaults()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=defaults["lr"], weight_decay=defaults["weight_decay"])
    present = torch.ones(batch_size, len(RG_DIMS), dtype=torch.bool, device=device)

    def step(batch) -> float:
        features, available, target = batch
        _, total, _ = forward_and_loss(model, features, available, present, target, precision, device)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, defaults["grad_clip"])
        optimizer.step()
        return float(total.detach())

    mib = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 2**20  # noqa: E731
    base = [p for name, p in model.llm.named_parameters() if "lora_" not in name]
    facts = {
        "llm": LIMSSR_LLM_BY_DEVICE[device.type], "llm_dtype": model.config.torch_dtype,
        "sequence_length": model.sequence_length(clips), "trainable_parameters": sum(p.numel() for p in params),
        "saved_mib": mib(model.state_to_save().values()), "base_llm_mib": mib(base),
    }
    return step, data, sum(p.numel() for p in model.parameters()), facts


def check_limssr(device: torch.device, batch_size: int, clips: int) -> dict[str, float]:
    """Gradient checkpointing recomputes the same function: same score, loss and gradients (dropout off;
    bfloat16 on a GPU rounds the recomputation differently, hence the looser tolerance there)."""
    outs, totals, grads = [], [], []
    features, available, target = any_subset_batches(1, batch_size, clips, device, seed=1)[0]
    present = torch.ones_like(available)
    for variant in LIMSSR_VARIANTS:
        torch.manual_seed(0)
        model = build_bench_limssr(variant, device, dropout=0.0)
        out = model(features, available)
        total, _ = model.loss(out, target, present, available)
        total.backward()
        outs.append(out["score"].detach())
        totals.append(total.detach())
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
        del model
    scale = max(g.abs().max().item() for g in grads[1].values() if g is not None)
    worst = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[1] if grads[1][k] is not None)
    diffs = {"score": (outs[0] - outs[1]).abs().max().item(), "loss": (totals[0] - totals[1]).abs().item(),
             "grad_relative": worst / max(scale, 1e-12)}
    tolerance = 1e-4 if device.type == "cpu" else 5e-2
    for key, value in diffs.items():
        assert value <= tolerance, f"LIMSSR with and without checkpointing differ in {key}: {value:.3g}"
    return diffs


# =============================================================================== driver

# model -> (variants, setup, equivalence check or None, batch size at the RG setting). setup(variant,
# device, batches, batch_size, clips) returns (step(batch) -> loss, batches, parameter count[, facts]).
# Speed-ups are relative to the last variant; the check compares the first and the last.
BENCHES: dict[str, tuple[tuple[str, ...], Callable, Callable | None, int]] = {
    "mcmoe": (("batched", "loop"), setup_mcmoe, check_mcmoe, 32),
    "mcmoe-adam": (OPTIMIZER_IMPLEMENTATIONS, setup_mcmoe_adam, check_mcmoe_adam, 32),
    "mcmoe-dropout": (DROPOUT_MASKS, setup_mcmoe_dropout, check_mcmoe_dropout, 32),
    "limssr": (tuple(LIMSSR_VARIANTS), setup_limssr, check_limssr, 8),
}


def ceilings(device: torch.device) -> dict[str, float | None]:
    """This machine's best fp32 and bf16 matmul rates in GFLOP/s (bf16 None where it is emulated)."""
    return {"fp32": max(matmul_rates(device, torch.float32).values()),
            "bf16": max(matmul_rates(device, torch.bfloat16).values()) if native_bf16(device) else None}


def fraction(rate: float, ceiling: float | None) -> float | None:
    return None if ceiling is None else rate / ceiling


def row_precision(variant: str, precision: str) -> str:
    return "fp32" if variant == "loop" else precision  # the reference loop runs in fp32 (setup_mcmoe)


def time_epoch(model: str, variant: str, device: torch.device, batches: int, batch_size: int,
               clips: int, precision: str = "fp32") -> dict[str, Any]:
    """One untimed warm-up step (allocator, kernels, optimiser state), then `batches` timed steps."""
    step, data, parameters, *facts = BENCHES[model][1](variant, device, batches + 1, batch_size, clips,
                                                       precision=precision)
    rss_before = peak_memory_mib(torch.device("cpu"))
    step(data[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = []
    start = time.perf_counter()
    for batch in data[1:]:
        began = time.perf_counter()
        loss = step(batch)
        step_s.append(time.perf_counter() - began)
    wall_s, peak_mib = time.perf_counter() - start, peak_memory_mib(device)
    counts = count_step(step, data[1])
    ceiling = ceilings(device)
    rate = counts["gflop_per_step"] / statistics.median(step_s)
    return {
        "wall_s": wall_s, "step_s": step_s, "peak_mib": peak_mib,
        "rss_before_mib": rss_before if device.type == "cpu" else None, "final_loss": loss,
        "parameters": parameters, "facts": facts[0] if facts else {}, **counts,
        "precision": row_precision(variant, precision), "gflop_per_s": rate,
        "ceiling_gflop_per_s": ceiling["fp32"], "fraction_of_ceiling": rate / ceiling["fp32"],
        "bf16_ceiling_gflop_per_s": ceiling["bf16"], "fraction_of_bf16_ceiling": fraction(rate, ceiling["bf16"]),
    }


def time_paired(model: str, device: torch.device, batches: int, batch_size: int, clips: int,
                precision: str = "fp32") -> dict[str, Any]:
    """All variants in one process, taking turns step by step on the same batches.

    Whatever else loads the machine then hits every variant alike; the median of the per-step time
    ratios is the speed-up. The order within a round rotates, so no variant always follows another. The
    ceilings (`ceilings`) are measured once per round, between the variants' steps, so each round also
    gives each variant's fraction of them; their medians are reported.
    """
    variants = BENCHES[model][0]
    setups = {v: BENCHES[model][1](v, device, batches + 1, batch_size, clips, precision=precision) for v in variants}
    gflop = {v: count_step(step, data[0])["gflop_per_step"] for v, (step, data, *_) in setups.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    rounds = []
    for index in range(batches + 1):
        turn = variants[index % len(variants):] + variants[:index % len(variants)]  # who goes first rotates
        for variant in turn:
            step, data, *_ = setups[variant]
            began = time.perf_counter()
            step(data[index])
            if index:  # the first round warms up
                times[variant].append(time.perf_counter() - began)
        if index:
            rounds.append(ceilings(device))

    def paired_fraction(kind: str) -> dict[str, float | None]:
        if rounds[0][kind] is None:
            return {v: None for v in variants}
        return {v: statistics.median(gflop[v] / t / c[kind] for t, c in zip(times[v], rounds)) for v in variants}

    base = times[variants[-1]]
    return {
        "speedup": {v: statistics.median(b / t for b, t in zip(base, times[v])) for v in variants},
        "paired_fraction": paired_fraction("fp32"), "paired_bf16_fraction": paired_fraction("bf16"),
        "ceilings": [c["fp32"] for c in rounds], "bf16_ceilings": [c["bf16"] for c in rounds],
    }


def run_child(args: argparse.Namespace, job: str, device: str, batch_size: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", job, "--device", device, "--batches", str(args.batches),
               "--batch-size", str(batch_size), "--clips", str(args.clips), "--precision", args.precision]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{job} on {device} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when a GPU is visible")
    parser.add_argument("--batches", type=int, default=8, help="training steps per timed epoch")
    parser.add_argument("--batch-size", type=int, help="(default: each model's RG batch size: mcmoe 32, limssr 8)")
    parser.add_argument("--clips", type=int, default=RG_CLIPS, help="segments per video")
    parser.add_argument("--repeats", type=int, default=1, help="epochs per variant; the fastest is reported")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="arithmetic of every variant but the fp32 reference loop (default: %(default)s)")
    parser.add_argument("--skip-check", action="store_true", help="do not compare the variants' numbers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # "model:variant" times an epoch, "model" the variants in turns
        model, _, variant = args.child.partition(":")
        args.batch_size = args.batch_size or BENCHES[model][3]
        sizes = (torch.device(args.device), args.batches, args.batch_size, args.clips)
        result = time_epoch(model, variant, *sizes, args.precision) if variant else time_paired(model, *sizes, args.precision)
        print(json.dumps(result))
        return result

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    lacking = [d for d in devices if args.precision == "bf16" and not native_bf16(torch.device(d))]
    if lacking:
        parser.error(f"--precision bf16: {lacking[0]} does not compute bfloat16 natively here (pipeline.devices.native_bf16)")
    report: dict[str, Any] = {
        "setting": {"batches": args.batches, "batch_size": args.batch_size or "per model", "clips": args.clips,
                    "repeats": args.repeats, "precision": args.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    **run_record()},
        "results": [], "checks": [],
    }
    for model in args.models:
        variants, _, check, model_batch_size = BENCHES[model]
        batch_size = args.batch_size or model_batch_size
        for device in devices:
            if check is not None and not args.skip_check:
                diffs = check(torch.device(device), batch_size, args.clips)
                report["checks"].append({"model": model, "device": device, "same": f"{variants[0]} == {variants[-1]}",
                                         "measured": getattr(check, "measures", "max |diff|"), **diffs})
            paired = run_child(args, model, device, batch_size)
            alone = time_adam_alone(torch.device(device)) if model == "mcmoe-adam" else {}
            for variant in variants:
                epochs = [run_child(args, f"{model}:{variant}", device, batch_size) for _ in range(args.repeats)]
                best = min(epochs, key=lambda r: r["wall_s"])
                report["results"].append({
                    **best, "model": model, "variant": variant, "device": device, "batch_size": batch_size,
                    "median_step_ms": 1000 * statistics.median(best["step_s"]),
                    "all_wall_s": [r["wall_s"] for r in epochs], "speedup": paired["speedup"][variant],
                    "paired_fraction": paired["paired_fraction"][variant], "paired_ceilings": paired["ceilings"],
                    "paired_bf16_fraction": paired["paired_bf16_fraction"][variant],
                    "paired_bf16_ceilings": paired["bf16_ceilings"],
                    **alone.get(variant, {}),
                })

    shown = lambda value: "-" if value is None else f"{value:.1%}"  # noqa: E731 (no bf16 ceiling: emulated)
    print(f"{'model':10} {'variant':13} {'device':6} {'prec':4} {'batch':>5} {'epoch s':>8} {'step ms':>8} "
          f"{'peak MiB':>9} {'speed-up':>9} {'GFLOP':>7} {'operators':>9} {'GFLOP/s':>8} {'fp32 ceil':>9} "
          f"{'of fp32':>7} {'paired':>7} {'bf16 ceil':>9} {'of bf16':>7} {'paired':>7}")
    for row in report["results"]:
        bf16_ceiling = "-" if row["bf16_ceiling_gflop_per_s"] is None else f"{row['bf16_ceiling_gflop_per_s']:.1f}"
        print(f"{row['model']:10} {row['variant']:13} {row['device']:6} {row['precision']:4} {row['batch_size']:5d} "
              f"{row['wall_s']:8.2f} {row['median_step_ms']:8.0f} {row['peak_mib']:9.0f} {row['speedup']:8.2f}x "
              f"{row['gflop_per_step']:7.1f} {row['operators_per_step']:9d} {row['gflop_per_s']:8.1f} "
              f"{row['ceiling_gflop_per_s']:9.1f} {row['fraction_of_ceiling']:7.1%} {row['paired_fraction']:7.1%} "
              f"{bf16_ceiling:>9} {shown(row['fraction_of_bf16_ceiling']):>7} {shown(row['paired_bf16_fraction']):>7}")
    for row in report["results"]:
        if "optimizer_step_ms" in row:
            print(f"{row['model']} {row['variant']} on {row['device']}: Adam's update alone {row['optimizer_step_ms']:.0f} ms, "
                  f"{row['optimizer_speedup']:.2f}x torch's default (paired)")
    for row in report["results"]:
        if row["facts"]:
            print(f"{row['model']} {row['variant']} on {row['device']}: "
                  + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["facts"].items()))
    for row in report["checks"]:
        diffs = {k: v for k, v in row.items() if k not in ("model", "device", "same", "measured")}
        print(f"{row['model']} on {row['device']}: {row['same']} ({row['measured']} "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ")")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
