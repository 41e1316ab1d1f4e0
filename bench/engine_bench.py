"""Engines side by side in one run on one device: IndicF5's dimensions, random weights, 32 NFE,
classifier-free guidance, text of 300 tokens, total lengths 1000 and 2000 frames.

    python bench/engine_bench.py [--small] [--out results.json]
    python bench/engine_bench.py --compiled fp16 bf16 bf16,precision=pure --load-test fp16 bf16
    python bench/engine_bench.py --skip-eager --buckets 1024 2048 --profile --compiled fp16 fp16,conv=cudnn
    python bench/engine_bench.py --compiled fp16 fp16,attention=padded --graph-only fp16,attention=padded
    python bench/engine_bench.py --skip-eager --compiled fp16 bf16,precision=fp8 --interleaved --fp8-layers
    python bench/engine_bench.py --skip-eager --compiled fp16 --batches 1 2 4 8 16 32 --batch-lengths 512 576
    python bench/engine_bench.py --skip-eager --compiled fp16 --schedules 16:epss 7:epss

Rows: the fp32 eager reference, eager fp16, the compiled engines (any build flags, e.g. bf16 in
mixed and pure precision) with and without the CUDA graph of the loop; the vocoder alone; end to
end (loop + vocoder). For each: p50 ms, achieved TFLOP/s of the loop against the bf16 matmul
rate measured first, peak memory, relL2 of the mel against the fp32 reference; for a graph, also
its replay alone (the rest of the loop column is sample()'s work around it); `--interleaved`
times the engines' replays again at the end, taking turns, for differences below the ~1% that
separates one process or machine from the next. `--profile` adds a
kernel breakdown of one step and, for one replay, the GPU's idle time and where it falls. Also
the load time of a saved compiled engine in a fresh process (a new compiler cache directory, so
nothing but the engine's own artifacts can help it), and the error floor of each low precision:
the fp32 network with its weights rounded to fp16 / bf16 / fp8 (what any engine of that precision
inherits from its weights alone). `--batches` times the captured loop per utterance at each batch
size (what a server's batches cost the engine), `--schedules` end to end and the mel error at
fewer steps (e.g. 16:epss) against the 32-step fp32 reference, `--fp8-layers` the error of each
FP8 layer's output on the reference's own activations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indicf5.backends.base import EngineSpec
from indicf5.backends.compiled import fp8
from indicf5.backends.compiled import CompiledBackend, CompiledEngine, bucket_for
from indicf5.config import TORCH_DTYPES, ModelConfig
from indicf5.model import DiT
from indicf5.sampler import sample
from indicf5.synthetic import random_transformer
from indicf5.vocoder import build_vocos


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=1, repeats=5, budget_ms=3000.0, most=25) -> float:
    """p50 milliseconds of at least `repeats` runs, more (up to `most`) where they fit in `budget_ms`."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or (len(times) < most and sum(times) + times[-1] < budget_ms):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def matmul_tflops(device) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ a, device, warmup=3, repeats=10)
    return 2 * 8192**3 / ms / 1e9


def loop_flops(c: ModelConfig, n: int, rows: int, nfe: int) -> float:
    """Matmul FLOPs of the ODE loop: projections, attention, feed-forward, embeddings."""
    per_token_block = 2 * (4 * c.dim * c.dim + 2 * c.dim * c.dim * c.ff_mult) + 4 * n * c.dim
    per_token = c.depth * per_token_block + 2 * (2 * c.mel_dim + c.text_dim) * c.dim + 2 * c.dim * c.mel_dim
    per_token += 2 * 2 * 31 * (c.dim // 16) * c.dim  # the two grouped position convolutions
    return per_token * n * rows * nfe


def peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


LOAD_SCRIPT = """
import logging, sys, time, torch
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from torch._dynamo.utils import counters
from indicf5.backends.base import read_spec
from indicf5.backends.compiled import COMPILE_CACHE, CompiledBackend, warm_up
start = time.perf_counter()
engine_dir, device = Path(sys.argv[1]), sys.argv[2]
spec = read_spec(engine_dir)
torch.compiler.load_cache_artifacts((engine_dir / COMPILE_CACHE).read_bytes())
t1 = time.perf_counter()
engine = CompiledBackend().engine(engine_dir / "model.safetensors", spec, device)
with torch.inference_mode():
    warm_up(engine)
    t2 = time.perf_counter()
    engine.capture()
t3 = time.perf_counter()
print(f"phases: cache artifacts {t1 - start:.1f} s, construct + warm-up (compile) {t2 - t1:.1f} s, "
      f"graph capture {t3 - t2:.1f} s")
print("inductor counters", dict(counters["inductor"]))
print(f"LOAD_SECONDS {t3 - start:.2f}  shapes captured {engine.captures}, "
      f"graph memory {engine.graph_memory_bytes() / 2**20:.0f} MiB")
from indicf5.sampler import sample
for size in map(int, sys.argv[3:]) if device == "cuda" else ():  # the loaded engine's kernels at the bench's buckets
    c = engine.dit.config
    cond = torch.randn(1, size // 3, c.mel_dim, device=device)
    text = torch.randint(0, 100, (1, size // 5), device=device)
    sample(engine, cond, text, [size], nfe=32, seed=0, dtype=engine.state_dtype)  # the buffers hold a real utterance
    engine.replay(size, 1, 32)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        engine.replay(size, 1, 32)
    end.record()
    torch.cuda.synchronize()
    print(f"loaded engine: replay of the {size}-frame bucket {begin.elapsed_time(end) / 10:.1f} ms")
"""


def parse_variant(variant: str) -> tuple[str, dict]:
    """'bf16,precision=pure,conv=cudnn' -> ('bf16', {'precision': 'pure', 'conv': 'cudnn'})."""
    dtype, *pairs = variant.split(",")
    flags = dict(pair.split("=", 1) for pair in pairs)
    return dtype, {k: json.loads(v) if v in ("true", "false") or v.isdigit() else v for k, v in flags.items()}


def profile_step(engine, n: int, device: str, top: int = 14) -> None:
    """GPU kernel time of one guided step (no graph), by kernel, summed over 5 steps."""
    from torch.profiler import ProfilerActivity, profile

    args = engine.example_inputs(2, bucket_for(n, engine.buckets))
    for _ in range(3):
        engine.step(*args)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step(*args)
        sync(device)
    kernels = [
        (e.key, e.self_device_time_total / 5e3, e.count // 5)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    kernels.sort(key=lambda k: -k[1])
    total = sum(ms for _, ms, _ in kernels)
    print(
        f"  profile {n} frames: GPU kernel time {total:.3f} ms/step in {sum(c for *_, c in kernels)} kernels",
        flush=True,
    )
    for name, ms, count in kernels[:top]:
        print(f"    {ms:7.3f} ms {100 * ms / total:5.1f}%  x{count:<4} {name[:110]}", flush=True)


def kernel_family(kernel: str) -> str:
    """A kernel's family: 'nvjet', 'cudnn', 'triton_per', 'Memset', ..."""
    for family in ("nvjet", "cudnn", "Memset", "triton_per", "triton_poi", "triton_red", "cutlass", "elementwise"):
        if family in kernel:
            return family
    return kernel.split("(")[0][-30:]


def profile_graph(engine, n: int, top: int = 8) -> None:
    """One replay of the captured loop of n frames: its span on the GPU against the time some
    kernel was running (the difference is launch gaps, wherever no stream had work), and in
    which kernel-to-kernel transitions the gaps lie."""
    from torch.profiler import ProfilerActivity, profile

    size = bucket_for(n, engine.buckets)
    engine.replay(size, 1, 32)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.replay(size, 1, 32)
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not kernels:
        print(f"  graph {n} frames: the profiler saw no kernels of the replay", flush=True)
        return
    busy, reach, gaps = 0.0, kernels[0][0], {}
    for (start, end, name), before in zip(kernels, [None, *kernels[:-1]]):
        if start > reach and before is not None:
            key = f"{kernel_family(before[2])} -> {kernel_family(name)}"
            gaps[key] = gaps.get(key, 0.0) + start - reach
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = reach - kernels[0][0]
    print(
        f"  graph {n} frames: span {span / 1e3:.1f} ms, some kernel running {busy / 1e3:.1f} ms, "
        f"idle {(span - busy) / 1e3:.1f} ms, {len(kernels)} kernels",
        flush=True,
    )
    for key, us in sorted(gaps.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    idle {us / 1e3:6.2f} ms after {key}", flush=True)


def interleaved_replays(
    engines: dict[str, CompiledEngine], lengths: list[int], rounds: int = 12, replays: int = 5
) -> dict:
    """Median replay ms of each engine's graph at each length's bucket, the engines taking turns
    round by round, so clock and thermal drift fall on all of them alike."""
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in engines for n in lengths}
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for name, engine in engines.items():
            for n in lengths:
                size = bucket_for(n, engine.buckets)
                engine.replay(size, 1, 32)
                begin.record()
                for _ in range(replays):
                    engine.replay(size, 1, 32)
                end.record()
                torch.cuda.synchronize()
                times[(name, n)].append(begin.elapsed_time(end) / replays)
    return {key: sorted(v)[len(v) // 2] for key, v in times.items()}


def fp8_rounded_weights(dit: DiT) -> None:
    """The blocks' FP8 layers of an fp32 DiT with their weights rounded through e4m3 (per output channel)."""
    with torch.no_grad():
        for block in dit.transformer_blocks:
            for linear in fp8.reference_layers(block).values():
                linear.weight.copy_(fp8.dequantize(*fp8.quantize_rows(linear.weight)))


def fp8_layer_errors(reference: DiT, inputs, n: int, device: str, results: dict, top: int = 10) -> None:
    """relL2 of each FP8 layer's output against the fp32 layer, on the activations the reference
    itself feeds that layer in one guided step at t = 0.5 (hooks), worst first."""
    cond, text = inputs
    errors = {}
    hooks = []

    def watch(name, weight, bias):
        def hook(module, args, out):
            x = args[0].flatten(0, -2)
            errors.setdefault(name, []).append(
                float((fp8.Fp8Linear.of(weight, bias, torch.float32)(x) - out.flatten(0, -2)).norm() / out.norm())
            )

        return hook

    for i, block in enumerate(reference.transformer_blocks):
        for name, linear in fp8.reference_layers(block).items():
            hooks.append(linear.register_forward_hook(watch(f"{i}.{name}", linear.weight, linear.bias)))
    x = torch.randn(1, n, reference.config.mel_dim, device=device)
    full = torch.nn.functional.pad(cond, (0, 0, 0, n - cond.shape[1]))
    with torch.inference_mode():
        reference(
            torch.cat((x, x)),
            torch.cat((full, torch.zeros_like(full))),
            reference.embed_text(torch.cat((text, torch.full_like(text, -1))), n),
            torch.tensor(0.5, device=device),
        )
    for h in hooks:
        h.remove()
    worst = sorted(((max(v), k) for k, v in errors.items()), reverse=True)
    results["fp8_layer_rel_l2"] = {k: max(v) for k, v in errors.items()}
    print(
        f"FP8 layer outputs vs fp32 at {n} frames: median {sorted(e for e, _ in worst)[len(worst) // 2]:.2e}, worst:",
        flush=True,
    )
    for err, name in worst[:top]:
        print(f"    block.layer {name:10} relL2 {err:.2e}", flush=True)


def batch_replays(
    engine: CompiledEngine, variant: str, lengths: list[int], batches: list[int], nfe: int, results: dict
) -> None:
    """ms per utterance at each batch size of utterances of n frames (a third reference, text of a
    fifth): sample() whole, and the captured loop's replay alone after it (its buffers then hold
    that batch): the engine's own throughput at the shapes a server forms."""
    c, g = engine.dit.config, torch.Generator().manual_seed(1)
    for n in lengths:
        size = bucket_for(n, engine.buckets)
        base = None
        for rows in batches:
            if rows * size > engine.max_tokens:
                continue
            cond = torch.randn(rows, n // 3, c.mel_dim, generator=g).cuda()
            text = torch.randint(0, c.text_num_embeds, (rows, n // 5), generator=g).cuda()

            def run(cond=cond, text=text, rows=rows):
                return sample(engine, cond, text, [n] * rows, nfe=nfe, seed=list(range(rows)), dtype=engine.state_dtype)

            whole = timed(run, "cuda", repeats=3) / rows
            ms = timed(lambda: engine.replay(size, rows, nfe), "cuda", repeats=5) / rows
            base = base or ms
            results.setdefault("batch_ms_per_utterance", {}).setdefault(variant, {}).setdefault(str(n), {})[rows] = {
                "sample": whole,
                "replay": ms,
            }
            print(
                f"  batch {variant:24} {n:5} frames (bucket {size}) x {rows:3}: replay {ms:7.2f} ms an utterance "
                f"({base / ms:4.2f}x batch {batches[0]}), sample() {whole:7.2f} ms",
                flush=True,
            )


def schedule_row(
    engine, variant: str, steps: int, schedule: str, inputs, reference, vocoder, device: str, results: dict
) -> None:
    """End to end (loop + vocoder) at `steps` steps of `schedule`, and the mel's relL2 against the
    fp32 reference's 32 uniform steps."""
    for n, (cond, text) in inputs.items():
        run = lambda: sample(engine, cond, text, [n], nfe=steps, schedule=schedule, seed=0, dtype=engine.state_dtype)
        mel = run()
        e2e = timed(lambda: vocoder.decode(run()[:, cond.shape[1] :].transpose(1, 2).float()), device, repeats=5)
        rel = float((mel.double() - reference[n].double()).norm() / reference[n].double().norm())
        results["rows"].append(
            {"engine": f"compiled {variant} {steps} {schedule}", "frames": n, "e2e_ms": e2e, "rel_l2_vs_fp32": rel}
        )
        print(
            f"  {variant} {steps:3} steps {schedule:8} {n:5} frames: e2e {e2e:7.1f} ms  "
            f"mel relL2 vs fp32 32 uniform {rel:.2e}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny dimensions (a CPU smoke run)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--nfe", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument(
        "--compiled",
        nargs="+",
        default=["fp16", "bf16"],
        help="compiled engines: DTYPE[,FLAG=VALUE...] over the backend's default build flags, e.g. bf16,precision=pure",
    )
    ap.add_argument(
        "--load-test", nargs="*", default=["fp16"], help="variants whose saved engine is loaded in a fresh process"
    )
    ap.add_argument(
        "--graph-only", nargs="*", default=[], help="variants timed with their CUDA graph only (no launch-bound rows)"
    )
    ap.add_argument(
        "--buckets", type=int, nargs="+", help="the compiled engines' length buckets (default: the backend's)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="each compiled engine: a GPU kernel breakdown of one step, and the idle time of one graph replay",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-eager", action="store_true", help="compiled engines only")
    ap.add_argument(
        "--interleaved",
        action="store_true",
        help="keep the compiled engines and, at the end, time their replays taking turns (a same-process A/B)",
    )
    ap.add_argument("--no-vocoder", dest="vocoder", action="store_false")
    ap.add_argument(
        "--batches", type=int, nargs="*", default=[], help="batch sizes whose captured loop is timed per utterance"
    )
    ap.add_argument(
        "--batch-lengths", type=int, nargs="+", default=[512, 576], help="total frames of the --batches rows"
    )
    ap.add_argument(
        "--schedules", nargs="*", default=[], help="STEPS:SCHEDULE runs of each compiled engine, e.g. 16:epss 7:epss"
    )
    ap.add_argument(
        "--fp8-layers", action="store_true", help="the relL2 of each FP8 layer's output on the reference's activations"
    )
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = (
        ModelConfig(dim=64, depth=2, heads=4, dim_head=16, text_dim=32, conv_layers=1, text_num_embeds=300)
        if args.small
        else ModelConfig(text_num_embeds=2545)
    )
    state = random_transformer(config, seed=0)
    rate = matmul_tflops(device)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_bf16_tflops": rate,
        "nfe": args.nfe,
        "rows": [],
    }
    print(f"device {results['device']}, torch {torch.__version__}, bf16 matmul {rate:.0f} TFLOP/s", flush=True)

    def dit(dtype: str) -> DiT:
        m = DiT(config)
        m.load_state_dict(state)
        return m.to(device=device, dtype=TORCH_DTYPES[dtype]).eval().requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    inputs = {}
    for n in args.lengths:
        ref_frames = n // 3
        inputs[n] = (
            torch.randn(1, ref_frames, config.mel_dim, generator=g).to(device),
            torch.randint(0, config.text_num_embeds, (1, min(args.text_tokens, n - ref_frames - 1)), generator=g).to(
                device
            ),
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vocoder = build_vocos().to(device).eval() if not args.small else build_vocos(64, 192, 2).to(device).eval()
    reference: dict[int, torch.Tensor] = {}

    def run_row(label: str, model, dtype: str):
        for n in args.lengths:
            cond, text = inputs[n]
            run = lambda: sample(model, cond, text, [n], nfe=args.nfe, seed=0, dtype=TORCH_DTYPES[dtype])
            reset_peak(device)
            mel = run()
            loop_ms = timed(run, device, repeats=3 if label.startswith("eager fp32") else 5)
            generated = mel[:, cond.shape[1] :].transpose(1, 2)
            e2e_ms = timed(lambda: vocoder.decode(run()[:, cond.shape[1] :].transpose(1, 2).float()), device, repeats=3)
            if n not in reference:
                reference[n] = mel
            rel = float((mel.double() - reference[n].double()).norm() / reference[n].double().norm())
            tflops = loop_flops(config, n, 2, args.nfe) / loop_ms / 1e9
            row = {
                "engine": label,
                "frames": n,
                "loop_ms": loop_ms,
                "e2e_ms": e2e_ms,
                "loop_tflops": tflops,
                "fraction_of_matmul_rate": tflops / rate if rate == rate else None,
                "peak_mb": peak_mb(device),
                "rel_l2_vs_fp32": rel,
                "finite": bool(torch.isfinite(mel).all()),
            }
            graphed = getattr(model, "cuda_graphs", False)
            if graphed:  # what of the loop's time is the graphs' replay, and what the rest of sample()
                row["replay_ms"] = timed(lambda: model.replay(bucket_for(n, model.buckets), 1, args.nfe), device)
            results["rows"].append(row)
            replay = f"  (replay {row['replay_ms']:6.1f} ms)" if graphed else ""
            print(
                f"{label:32} {n:5} frames: loop {loop_ms:8.1f} ms  e2e {e2e_ms:8.1f} ms  {tflops:6.1f} TFLOP/s  "
                f"peak {row['peak_mb']:8.0f} MB  relL2 {rel:.2e}{replay}",
                flush=True,
            )
            del generated

    if not args.skip_eager:
        run_row("eager fp32 (reference)", dit("fp32"), "fp32")
        run_row("eager fp16", dit("fp16"), "fp16")
    else:  # the reference's output alone, for the error columns
        for n in args.lengths:
            reference[n] = sample(dit("fp32"), *inputs[n], [n], nfe=args.nfe, seed=0)
    for low in ("fp16", "bf16", "fp8"):
        rounded = dit("fp32")
        rounded.load_state_dict(
            {k: v.to(TORCH_DTYPES[low]).float() for k, v in state.items()} if low != "fp8" else state
        )
        if low == "fp8":  # the blocks' FP8 layers' weights through e4m3 and back, the rest fp32
            fp8_rounded_weights(rounded)
        for n in args.lengths:
            rel = float(
                (sample(rounded, *inputs[n], [n], nfe=args.nfe, seed=0).double() - reference[n].double()).norm()
                / reference[n].double().norm()
            )
            results["rows"].append({"engine": f"fp32 math, {low}-rounded weights", "frames": n, "rel_l2_vs_fp32": rel})
            print(
                f"{'fp32 math, ' + low + '-rounded weights':32} {n:5} frames: relL2 {rel:.2e} (the {low} weight floor)",
                flush=True,
            )
        del rounded

    backend = CompiledBackend()
    kept: dict[str, CompiledEngine] = {}  # --interleaved: the engines whose replays take turns at the end
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(args.compiled):
            torch._dynamo.reset()  # each engine compiles from scratch, and none fills another's recompile budget
            dtype, flags = parse_variant(variant)
            if args.buckets:
                flags["buckets"] = args.buckets
            weights = Path(tmp) / f"weights-{i}"
            weights.mkdir()
            save_file(
                {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in state.items()},
                str(weights / "model.safetensors"),
            )
            spec = EngineSpec(
                backend="compiled",
                dtype=dtype,
                model=config,
                build_flags={**backend.default_flags(), **flags, "device": device},
            )
            engine_dir = Path(tmp) / f"engine-{i}"
            engine_dir.mkdir()
            start = time.perf_counter()
            try:
                info = backend.build(weights, spec, engine_dir)
            except Exception as e:  # one variant failing must not hide the others' numbers
                print(f"compiled {variant}: build FAILED: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            (engine_dir / "engine.json").write_text(spec.model_dump_json())
            print(f"compiled {variant}: build {time.perf_counter() - start:.0f} s ({info})", flush=True)
            engine = backend.engine(engine_dir / "model.safetensors", spec, device)
            if args.profile and device == "cuda":
                with torch.inference_mode():
                    for n in args.lengths:
                        try:
                            profile_step(engine, n, device)
                        except Exception as e:  # a profiler hiccup must not cost the timings
                            print(f"  profile {n} frames FAILED: {type(e).__name__}: {e}", flush=True)
            if device == "cuda" and variant not in args.graph_only:
                engine.cuda_graphs = False
                run_row(f"compiled {variant} no graph", engine, dtype)
                engine.cuda_graphs = True
            run_row(f"compiled {variant}" + (" + graph" if device == "cuda" else ""), engine, dtype)
            if args.profile and device == "cuda":
                for n in args.lengths:
                    try:
                        profile_graph(engine, n)
                    except Exception as e:  # as above: the timings stand without it
                        print(f"  graph {n} frames FAILED: {type(e).__name__}: {e}", flush=True)
            if args.batches and device == "cuda":
                batch_replays(engine, variant, args.batch_lengths, args.batches, args.nfe, results)
            for run in args.schedules:
                steps, schedule = run.split(":")
                schedule_row(engine, variant, int(steps), schedule, inputs, reference, vocoder, device, results)
            if args.interleaved and device == "cuda":
                kept[variant] = engine
            del engine
            if variant not in args.load_test:
                continue
            env = dict(
                os.environ,
                TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / f"fresh-cache-{i}"),
                PYTHONPATH=os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
                ),
            )
            buckets = {
                str(bucket_for(n, tuple(spec.build_flags["buckets"]))) for n in args.lengths
            }  # replayed after the load
            done = subprocess.run(
                [sys.executable, "-c", LOAD_SCRIPT, str(engine_dir), device, *buckets],
                capture_output=True,
                text=True,
                env=env,
            )
            print(done.stdout, flush=True)
            load = [line for line in done.stdout.splitlines() if line.startswith("LOAD_SECONDS")]
            results.setdefault("load_seconds", {})[variant] = float(load[0].split()[1]) if load else done.stderr[-1500:]
            print(
                f"load of the saved {variant} engine in a fresh process (cold compiler cache): "
                f"{results['load_seconds'][variant]} s",
                flush=True,
            )

    if args.fp8_layers:
        fp8_layer_errors(dit("fp32"), inputs[args.lengths[0]], args.lengths[0], device, results)

    if kept:
        medians = interleaved_replays(kept, args.lengths)
        first = next(iter(kept))
        for (variant, n), ms in medians.items():
            results.setdefault("interleaved_replay_ms", {}).setdefault(variant, {})[n] = ms
            print(
                f"interleaved replay {variant:40} {n:5} frames: {ms:7.2f} ms  "
                f"({ms / medians[(first, n)]:.4f} x {first})",
                flush=True,
            )
        kept.clear()

    for n in args.lengths if args.vocoder else ():
        frames = n - n // 3
        mel = torch.randn(1, config.mel_dim, frames, device=device)
        ms = timed(lambda: vocoder.decode(mel), device)
        results["rows"].append({"engine": "vocoder (vocos, fp32)", "frames": frames, "e2e_ms": ms})
        print(f"{'vocoder alone':32} {frames:5} frames: {ms:8.1f} ms", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
