"""Where one MCMoE training step spends its time on this machine: torch's profiler over a few steps.

    python benchmarks/profile_train.py                    # RG setting: batch 32, T 68, rgb/flow 1024, audio 768
    python benchmarks/profile_train.py --steps 3 --rows 25 --shapes
    python benchmarks/profile_train.py --parts --precision bf16   # time and FLOPs per model part

The step is `pipeline train`'s, on synthetic samples of the RG shapes: a batch from
`data.training_batches` (shuffle, random crops, collate), `data.draw_training_masks`, forward, loss,
backward, the optimiser `pipeline.stages.train.build_optimizer` makes, and the per-step bookkeeping of the
loop (the loss terms read as floats). Each phase is a `record_function` region. After --warmup
unprofiled steps, --steps steps run under torch.profiler (CPU, record_shapes).

Printed: the operators by their own (self) CPU time; each phase's wall time, split into the time
inside aten operators and the rest (Python, autograd engine, optimiser loop: host work outside any
operator); and the dispatch floor, the cost of one trivial operator times the operators per step.

--parts instead times every operator of --steps steps by itself (`PartTimer`, no torch.profiler) and
books its time and FLOPs to the part of the model that ran it: a top-level module of MCMoE
(projections, stem, generators, router, fusion, decoder), else the MCMoE method it ran in (the
experts' `ExpertBank.all_pairs` / `ExpertBank.own`, `MCMoE._complete`, `MCMoE.forward` for the
routing and the grade head, `MCMoE.loss`), the optimiser, or the data. A backward operator goes to
the part whose forward created its autograd node, so each part has a forward and a backward column.
Timing each operator alone adds host work between operators, so the parts' times add up to less than
a step; the shares are what to read. --precision bf16 runs the forward pass as `pipeline train
--precision bf16` does; the dtype conversions autocast inserts show up as `_to_copy` operators.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import is_arithmetic, run_record  # noqa: E402
from benchmarks.bench_train import RG_CLIPS, RG_DIMS  # noqa: E402
from models.mcmoe import mcmoe  # noqa: E402
from pipeline import data  # noqa: E402
from pipeline.inference import call_model  # noqa: E402
from models.layers import use_uniform_dropout  # noqa: E402
from pipeline.stages.train import build_optimizer, forward_and_loss  # noqa: E402
from pipeline.train_config import DROPOUT_MASKS, OPTIMIZER_IMPLEMENTATIONS, PRECISIONS, TrainConfig  # noqa: E402

PHASES = ("data", "forward", "loss", "backward", "optimizer", "bookkeeping")


def synthetic_samples(count: int, clips: int, seed: int = 0) -> list[data.Sample]:
    """Videos of the RG feature sizes, somewhat longer than clip_num so that crops are drawn."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        length = clips + int(rng.integers(0, clips // 2))
        features = {m: rng.standard_normal((length, c), dtype=np.float32) for m, c in RG_DIMS.items()}
        samples.append(data.Sample(f"video{index}", features, float(rng.uniform(0, 100))))
    return samples


def training_steps(implementation: str, batch_size: int, clips: int, seed: int = 0,
                   dropout_masks: str = TrainConfig.dropout_masks, precision: str = "fp32", model=None):
    """An endless iterator of `pipeline train` steps; each call of next() runs one, in labelled phases."""
    torch.manual_seed(seed)
    model = model or mcmoe(list(RG_DIMS), RG_DIMS, position_encoding=True).train()
    if dropout_masks == "uniform":
        use_uniform_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    defaults = model.config.training_defaults()
    optimizer = build_optimizer(defaults["optimizer"], params, defaults["lr"], defaults["weight_decay"], implementation)
    samples = synthetic_samples(4 * batch_size, clips, seed)
    generator = torch.Generator().manual_seed(seed)
    sizes = (list(RG_DIMS), RG_DIMS, clips, batch_size)
    score_range = 100.0
    while True:
        for batch in data.training_batches(samples, *sizes, generator):
            with record_function("data"):
                available = data.draw_training_masks(batch.present, "incomplete", generator)
                batch = batch.to(torch.device("cpu"))
            if precision == "fp32":
                with record_function("forward"):
                    out = call_model(model, batch.features, available, batch.present)
                with record_function("loss"):
                    total, terms = model.loss(out, batch.score / score_range, batch.present, available)
            else:  # one region: forward_and_loss runs both, as `pipeline train` does
                with record_function("forward"):
                    out, total, terms = forward_and_loss(model, batch.features, available, batch.present,
                                                         batch.score / score_range, precision, torch.device("cpu"))
            with record_function("loss"):
                if not torch.isfinite(total):
                    raise RuntimeError("non-finite loss")
            with record_function("backward"):
                optimizer.zero_grad(set_to_none=True)
                total.backward()
            with record_function("optimizer"):
                optimizer.step()
            with record_function("bookkeeping"):
                sums = {k: float(v) * len(batch.video_ids) for k, v in {"loss": total.detach(), **terms}.items()}
                kept = (out["score"].detach().float().cpu() * score_range, batch.score.cpu())
            yield sums, kept


def timed_batches(steps, count: int) -> list[float]:
    """Wall time of `count` steps, the batch assembly (collate) included."""
    times = []
    for _ in range(count):
        began = time.perf_counter()
        next(steps)
        times.append(time.perf_counter() - began)
    return times


def dispatch_floor_us(repeats: int = 20000) -> float:
    """Microseconds of one trivial operator (an in-place add on a one-element tensor): the framework's
    per-operator cost, which every operator of a step pays on top of its arithmetic."""
    x = torch.zeros(1)
    for _ in range(1000):
        x.add_(1.0)
    began = time.perf_counter()
    for _ in range(repeats):
        x.add_(1.0)
    return (time.perf_counter() - began) / repeats * 1e6


def phase_split(profiler) -> dict[str, dict[str, float]]:
    """Per phase: wall time, time inside aten operators (their self times summed), and the rest, all
    in ms summed over the profiled steps. The batch assembly (collate, inside the generator's next())
    runs before the "data" region opens; it is the time between one step's bookkeeping and the next
    step's first region and is reported as "collate"."""
    split = {p: {"wall_ms": 0.0, "operators_ms": 0.0, "operators": 0} for p in PHASES}

    def inside(event) -> tuple[float, int]:
        own = event.self_cpu_time_total if event.name.startswith("aten::") else 0.0
        count = 1 if event.name.startswith("aten::") and event.cpu_parent is not None \
            and not event.cpu_parent.name.startswith("aten::") else 0
        for child in event.cpu_children:
            t, c = inside(child)
            own, count = own + t, count + c
        return own, count

    regions = sorted((e for e in profiler.events() if e.name in PHASES and e.cpu_parent is None),
                     key=lambda e: e.time_range.start)
    for event in regions:
        operators_us, count = inside(event)
        split[event.name]["wall_ms"] += event.cpu_time_total / 1e3
        split[event.name]["operators_ms"] += operators_us / 1e3
        split[event.name]["operators"] += count
    # collate: the gaps between a "bookkeeping" region's end and the next "data" region's start
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(regions, regions[1:])
            if a.name == "bookkeeping" and b.name == "data"]
    split["collate"] = {"wall_ms": sum(gaps) / 1e3, "operators_ms": float("nan"), "operators": 0}
    for row in split.values():
        row["outside_ms"] = row["wall_ms"] - row["operators_ms"]
    return split


def profile_steps(implementation: str, batch_size: int, clips: int, warmup: int, steps: int, rows: int,
                  shapes: bool, dropout_masks: str = TrainConfig.dropout_masks, precision: str = "fp32") -> dict:
    stepper = training_steps(implementation, batch_size, clips, dropout_masks=dropout_masks, precision=precision)
    timed_batches(stepper, warmup)
    unprofiled = timed_batches(stepper, steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        began = time.perf_counter()
        timed_batches(stepper, steps + 1)  # the last step's "data" region closes the last collate gap
        profiled_s = time.perf_counter() - began
    events = [e for e in profiler.key_averages(group_by_input_shape=shapes) if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    operators_us = sum(e.self_cpu_time_total for e in events)
    arithmetic_us = sum(e.self_cpu_time_total for e in events if is_arithmetic(e.key))
    split = phase_split(profiler)
    # the regions of the extra step (steps + 1) are counted too: scale per step by the regions seen
    per_step = steps + 1
    floor = dispatch_floor_us()
    top_level_ops = sum(row["operators"] for row in split.values()) / per_step
    report = {
        "implementation": implementation, "dropout_masks": dropout_masks, "precision": precision, "batch_size": batch_size, "clips": clips, "steps": steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, **run_record(),
        "step_ms_unprofiled": [1000 * t for t in unprofiled],
        "median_step_ms_unprofiled": 1000 * statistics.median(unprofiled),
        "step_ms_profiled": 1000 * profiled_s / per_step,
        "operators_self_ms_per_step": operators_us / 1e3 / per_step,
        "arithmetic_share_of_operators": arithmetic_us / operators_us,
        "top_level_operators_per_step": top_level_ops,
        "dispatch_floor_us": floor,
        "dispatch_floor_ms_per_step": floor * top_level_ops / 1e3,
        "phases_ms_per_step": {p: {k: (v / per_step if k != "operators" else v / per_step) for k, v in row.items()}
                               for p, row in split.items()},
        "top_operators": [
            {"operator": e.key, "shapes": str(e.input_shapes) if shapes else None,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / per_step,
             "share": e.self_cpu_time_total / operators_us, "calls_per_step": e.count / per_step}
            for e in events[:rows]
        ],
    }
    return report


# --------------------------------------------------------------------------- --parts

MODEL_FILE = str(Path(__file__).resolve().parents[1] / "models" / "mcmoe.py")
NOT_COMPUTING = {"aten.detach", "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute",
                 "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.select", "aten.slice", "aten.split",
                 "aten.split_with_sizes", "aten.chunk", "aten.as_strided", "aten.alias", "aten.lift_fresh",
                 "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.unbind", "aten.diagonal",
                 "aten.unflatten", "aten.flatten", "aten.reshape", "aten.view_as", "aten.expand_as"}


class PartTimer(TorchDispatchMode):
    """Times each aten operator and counts its FLOPs, booked to (part, "forward" | "backward", operator).

    The forward part: the innermost top-level MCMoE module running (module hooks), else the innermost
    function of models/mcmoe.py on the Python stack (qualified name), else the optimiser or "other".
    A backward operator runs inside an autograd node; `NodeParts` knows which part created it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.modules: list[str] = []
        self.nodes = NodeParts(self)
        self.time: dict[tuple[str, str, str], float] = defaultdict(float)
        self.flops: dict[tuple[str, str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str, str], int] = defaultdict(int)
        for name, child in model.named_children():
            for module in [child, *(child.values() if isinstance(child, torch.nn.ModuleDict) else
                                    child if isinstance(child, torch.nn.ModuleList) else [])]:
                module.register_forward_pre_hook(lambda *_, name=name: self.modules.append(name))
                module.register_forward_hook(self._leave)

    def _leave(self, *_) -> None:  # a forward hook's return value would replace the module's output
        self.modules.pop()

    def part(self) -> str:
        if self.modules:
            return self.modules[-1]
        frame = sys._getframe(2)
        optimizer = False
        while frame is not None:
            if frame.f_code.co_filename == MODEL_FILE:
                return frame.f_code.co_qualname.split(".<locals>")[0]  # a helper lambda: its function
            optimizer = optimizer or "torch/optim/" in frame.f_code.co_filename
            frame = frame.f_back
        return "optimizer" if optimizer else "other (data, bookkeeping)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        node = torch._C._current_autograd_node()
        began = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - began
        name = str(func.overloadpacket)
        if name in NOT_COMPUTING:
            return out
        if node is None:
            key = (self.part(), "forward", name)
        else:
            key = (self.nodes.part_of(node._sequence_nr()), "backward", name)
        self.time[key] += seconds
        self.calls[key] += 1
        if func.overloadpacket in flop_registry:
            self.flops[key] += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


class NodeParts(TorchFunctionMode):
    """Which part created each autograd node: after every torch call of the forward pass, the nodes
    numbered up to its output's node (the call's own and those of what it was composed of) are the
    part's then running."""

    def __init__(self, timer: PartTimer) -> None:
        super().__init__()
        self.timer = timer
        self.bounds: list[int] = []
        self.parts: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        numbers = [t.grad_fn._sequence_nr() for t in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if numbers and (not self.bounds or max(numbers) > self.bounds[-1]):
            self.bounds.append(max(numbers))
            self.parts.append(self.timer.part())
        return out

    def part_of(self, number: int) -> str:
        if number >= 2**63:  # AccumulateGrad: a gradient added into a parameter's .grad
            return "gradient accumulation"
        index = bisect.bisect_left(self.bounds, number)
        return self.parts[index] if index < len(self.parts) else "other (data, bookkeeping)"


def part_breakdown(precision: str, batch_size: int, clips: int, warmup: int, steps: int) -> dict:
    """Per model part: forward and backward milliseconds and GFLOP per step, from `PartTimer`."""
    torch.manual_seed(0)
    model = mcmoe(list(RG_DIMS), RG_DIMS, position_encoding=True).train()
    stepper = training_steps("torch-default", batch_size, clips, precision=precision, model=model)
    timed_batches(stepper, warmup)
    timer = PartTimer(model)
    with timer.nodes, timer:
        began = time.perf_counter()
        timed_batches(stepper, steps)
        wall = (time.perf_counter() - began) / steps
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    operators: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, seconds in timer.time.items():
        part, direction, name = key
        parts[part][f"{direction}_ms"] += 1000 * seconds / steps
        parts[part][f"{direction}_gflop"] += timer.flops[key] / 1e9 / steps
        operators[name]["ms"] += 1000 * seconds / steps
        operators[name]["gflop"] += timer.flops[key] / 1e9 / steps
        operators[name]["calls"] += timer.calls[key] / steps
    total_ms = sum(v["ms"] for v in operators.values())
    total_gflop = sum(v["gflop"] for v in operators.values())
    # At their own measured rates the matmuls and convolutions alone take this long: no change to the
    # other operators can make the step faster than that.
    arithmetic_ms = sum(v["ms"] for o, v in operators.items() if is_arithmetic(o))
    return {
        "precision": precision, "batch_size": batch_size, "clips": clips, "steps": steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, **run_record(),
        "step_ms_timed_per_operator": 1000 * wall, "operators_ms": total_ms, "gflop_per_step": total_gflop,
        "arithmetic_ms": arithmetic_ms,
        "parts": {p: dict(v) for p, v in sorted(parts.items(), key=lambda kv: -sum(x for k, x in kv[1].items()
                                                                                   if k.endswith("_ms")))},
        "operators": {o: dict(v) for o, v in sorted(operators.items(), key=lambda kv: -kv[1]["ms"])},
    }


def print_parts(report: dict, rows: int) -> None:
    total_ms, total_gflop = report["operators_ms"], report["gflop_per_step"]
    print(f"MCMoE training step by part, {report['precision']}, batch {report['batch_size']}, T {report['clips']}, "
          f"{report['threads']} threads, torch {report['torch']}, commit {report['commit']}: "
          f"{total_gflop:.1f} GFLOP, operators {total_ms:.0f} ms of a {report['step_ms_timed_per_operator']:.0f} ms "
          "step (each operator timed alone)")
    print(f"matmuls and convolutions: {report['arithmetic_ms']:.0f} ms ({report['gflop_per_step'] / report['arithmetic_ms'] * 1e3:.0f} "
          "GFLOP/s): the step at these rates with every other operator free")
    print(f"{'part':28s} {'fwd ms':>8s} {'bwd ms':>8s} {'time':>6s} {'fwd GFLOP':>9s} {'bwd GFLOP':>9s} {'FLOPs':>6s} "
          f"{'GFLOP/s':>8s}")
    for part, row in report["parts"].items():
        ms = row.get("forward_ms", 0.0) + row.get("backward_ms", 0.0)
        gflop = row.get("forward_gflop", 0.0) + row.get("backward_gflop", 0.0)
        print(f"{part:28s} {row.get('forward_ms', 0.0):8.1f} {row.get('backward_ms', 0.0):8.1f} {ms / total_ms:6.1%} "
              f"{row.get('forward_gflop', 0.0):9.2f} {row.get('backward_gflop', 0.0):9.2f} {gflop / total_gflop:6.1%} "
              f"{gflop / ms * 1e3 if ms else 0.0:8.1f}")
    print(f"\n{'operator':36s} {'ms/step':>8s} {'time':>6s} {'GFLOP':>7s} {'calls':>6s}")
    for name, row in list(report["operators"].items())[:rows]:
        print(f"{name:36s} {row['ms']:8.1f} {row['ms'] / total_ms:6.1%} {row['gflop']:7.2f} {row['calls']:6.0f}")


def print_report(report: dict) -> None:
    print(f"MCMoE training step, batch {report['batch_size']}, T {report['clips']}, optimiser "
          f"{report['implementation']}, dropout masks {report['dropout_masks']}, {report['threads']} threads, torch {report['torch']}, commit {report['commit']}")
    print(f"step: {report['median_step_ms_unprofiled']:.0f} ms unprofiled (median of {report['steps']}), "
          f"{report['step_ms_profiled']:.0f} ms under the profiler; aten operators' own time "
          f"{report['operators_self_ms_per_step']:.0f} ms, of which arithmetic (matmul, convolution) "
          f"{report['arithmetic_share_of_operators']:.0%}")
    print(f"dispatch floor: {report['dispatch_floor_us']:.1f} us per operator x "
          f"{report['top_level_operators_per_step']:.0f} operators per step = {report['dispatch_floor_ms_per_step']:.0f} ms")
    print(f"\n{'phase':12s} {'wall ms':>9s} {'in ops ms':>10s} {'outside ms':>11s} {'share':>6s} {'ops':>6s}")
    phases = report["phases_ms_per_step"]
    whole = sum(row["wall_ms"] for row in phases.values())
    for name, row in phases.items():
        inside = "-" if row["operators_ms"] != row["operators_ms"] else f"{row['operators_ms']:.1f}"
        outside = "-" if row["operators_ms"] != row["operators_ms"] else f"{row['outside_ms']:.1f}"
        print(f"{name:12s} {row['wall_ms']:9.1f} {inside:>10s} {outside:>11s} {row['wall_ms'] / whole:6.1%} "
              f"{row['operators']:6.0f}")
    print(f"\n{'operator':36s} {'ms/step':>8s} {'share':>7s} {'calls':>6s}" + ("  shapes" if report["top_operators"][0]["shapes"] else ""))
    for row in report["top_operators"]:
        print(f"{row['operator']:36s} {row['self_ms_per_step']:8.1f} {row['share']:7.1%} {row['calls_per_step']:6.0f}"
              + (f"  {row['shapes'][:110]}" if row["shapes"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clips", type=int, default=RG_CLIPS)
    parser.add_argument("--optimizer-implementation", default="torch-default", choices=OPTIMIZER_IMPLEMENTATIONS)
    parser.add_argument("--dropout-masks", default=TrainConfig.dropout_masks, choices=DROPOUT_MASKS)
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--shapes", action="store_true", help="group the operators by input shapes too")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="as `pipeline train --precision`")
    parser.add_argument("--parts", action="store_true", help="time and FLOPs per model part (`PartTimer`)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.parts:
        report = part_breakdown(args.precision, args.batch_size, args.clips, args.warmup, args.steps)
        print_parts(report, args.rows)
    else:
        report = profile_steps(args.optimizer_implementation, args.batch_size, args.clips, args.warmup, args.steps,
                               args.rows, args.shapes, args.dropout_masks, args.precision)
        print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
