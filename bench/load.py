"""A bounded load test of `indicf5 serve` on loopback: throughput and latency percentiles per max
batch, side by side in one run, against the engine's own throughput on the same rows and the
matmul floor of the workload, and where a request's time goes in the server (mean ms in each
stage); and the time to the first audio byte of a long text with and without streaming.

    python bench/load.py --engine ENGINE_DIR [--requests 64 --concurrency 8 --max-batch 1 8 --device cuda]
    python bench/load.py --synthetic [...]           # builds a small synthetic eager engine first
    python bench/load.py --synthetic --size indicf5 --backend compiled --dtype fp16 --device cuda \
        --requests 128 --concurrency 32 --max-batch 1 8 16 32 --engine-rate --ttfb   # performance.md's table
    python bench/load.py --url http://host:8000 --voice NAME [...]   # an already running server

Each request is POST /v1/audio/speech of one of a few sentences in one voice. A warm-up round
(one request per client, not measured) comes first: it takes the engine's first-call costs for
the batch sizes the run will see. Prints requests/s, seconds of audio per second, latency
p50/p90/p99/max, errors by status, the server's mean rows per engine batch and the shapes it
captured after it turned ready (none, when its load captured them all), and the mean ms a request
spends in each server stage (prepare, queue, engine: its batch's loop on the device,
vocoder_wait: behind its batch-mates' vocoding, vocoder, encode), then what the server's own
latency leaves outside them ("unstaged": the threads' hand-offs) and what the client's latency
adds to the server's ("http"). `--engine-rate` also
renders the same requests' rows in this process, in batches of each max batch, for the engine's
own audio seconds per second (what the server should deliver); on a GPU the matmul floor is the
workload's matmul FLOPs at the measured bf16 rate. `--ttfb` times a long text (4+ chunks): the
whole response, the first byte of its stream, and its first chunk alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indicf5.audio import write_wav
from indicf5.serve.process import ServerProcess
from indicf5.synthetic import REF_TEXT, reference_clip

SENTENCES = ["नमस्ते, आप कैसे हैं?", "यह एक परीक्षण वाक्य है।", "आज मौसम बहुत अच्छा है।", "मुझे हिंदी बोलना पसंद है।"]
LONG_TEXT = " ".join(SENTENCES * 8)  # 4+ chunks with the 3 s reference


def metric(url: str, name: str) -> float:
    """A Prometheus sample of the server by its full name, labels included (`x_sum{stage="queue"}`)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


STAGES = ("prepare", "queue", "engine", "vocoder_wait", "vocoder", "encode")
SPEECH = 'indicf5_request_seconds_{}{{endpoint="/v1/audio/speech",status="200"}}'  # the server's own latency


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(seconds, observations) so far of each server stage (indicf5_stage_seconds)."""
    total = lambda stage, part: metric(url, f'indicf5_stage_seconds_{part}{{stage="{stage}"}}')
    return {stage: (total(stage, "sum"), total(stage, "count")) for stage in STAGES}


def run_load(url: str, voice: str, requests: int, concurrency: int, max_seconds: float, seed: int = 0) -> dict:
    deadline = time.monotonic() + max_seconds
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency), timeout=600) as client:

        def one(i: int):
            if time.monotonic() > deadline:
                return None
            start = time.perf_counter()
            r = client.post(
                f"{url}/v1/audio/speech",
                json={"input": SENTENCES[i % len(SENTENCES)], "voice": voice, "seed": seed + i},
            )
            return r.status_code, time.perf_counter() - start, float(r.headers.get("x-audio-seconds", 0))

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))  # warm-up
            batches0, rows0 = metric(url, "indicf5_batch_rows_count"), metric(url, "indicf5_batch_rows_sum")
            stages0 = stage_totals(url)
            served0 = metric(url, SPEECH.format("sum")), metric(url, SPEECH.format("count"))
            start = time.perf_counter()
            results = [r for r in pool.map(one, range(requests)) if r is not None]
            wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    latencies = np.array([r[1] for r in ok]) * 1e3
    errors: dict[str, int] = {}
    for status, _, _ in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    batches = metric(url, "indicf5_batch_rows_count") - batches0
    stages = {
        stage: (seconds - stages0[stage][0]) / (count - stages0[stage][1]) * 1e3
        for stage, (seconds, count) in stage_totals(url).items()
        if count > stages0[stage][1]
    }  # mean ms a request (a job: a request of one chunk) spends in each stage
    served = metric(url, SPEECH.format("count")) - served0[1]
    server_ms = (metric(url, SPEECH.format("sum")) - served0[0]) / served * 1e3 if served else float("nan")
    pct = lambda q: float(np.percentile(latencies, q)) if len(latencies) else float("nan")
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "wall_s": wall,
        "rps": len(ok) / wall,
        "audio_s_per_s": sum(r[2] for r in ok) / wall,
        "mean_ms": float(latencies.mean()) if len(latencies) else float("nan"),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": float(latencies.max()) if len(latencies) else float("nan"),
        "rows_per_batch": (metric(url, "indicf5_batch_rows_sum") - rows0) / batches if batches else float("nan"),
        "captures_after_ready": metric(url, "indicf5_engine_captures_after_ready"),
        "compiles_after_ready": metric(url, "indicf5_engine_compiles_after_ready"),
        "graph_memory_mib": metric(url, "indicf5_engine_graph_memory_bytes") / 2**20,
        "stage_ms": stages,
        "server_ms": server_ms,  # mean latency in the server, request received to response sent
    }


def time_to_first_byte(url: str, voice: str, text: str, stream: bool) -> float:
    """ms from sending /v1/audio/speech to its first audio byte (a streamed pcm response), or to
    its whole body (not streamed: the first byte comes with the last)."""
    start = time.perf_counter()
    body = {"input": text, "voice": voice, "seed": 0, "response_format": "pcm", "stream": stream}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=600) as r:
        r.raise_for_status()
        first = None
        for chunk in r.iter_bytes():
            if chunk and first is None:
                first = time.perf_counter()
    return ((first if stream else time.perf_counter()) - start) * 1e3


def ttfb(url: str, voice: str, chunk_text: str) -> dict:
    """Median of 3 of each: the long text whole, its stream's first byte, its first chunk alone."""
    med = lambda f: float(np.median([f() for _ in range(3)]))
    return {
        "whole_ms": med(lambda: time_to_first_byte(url, voice, LONG_TEXT, False)),
        "stream_first_byte_ms": med(lambda: time_to_first_byte(url, voice, LONG_TEXT, True)),
        "first_chunk_alone_ms": med(lambda: time_to_first_byte(url, voice, chunk_text, False)),
    }


def first_chunk(ref: Path) -> str:
    """LONG_TEXT's first chunk as the server cuts it for the reference."""
    from indicf5.audio import prepare_reference
    from indicf5.config import MelConfig, SamplingConfig
    from indicf5.synth import text_chunks

    sampling = SamplingConfig()
    reference = prepare_reference(ref, sampling.target_rms)
    frames = reference.wave.shape[-1] // MelConfig().hop_length
    return text_chunks(LONG_TEXT, REF_TEXT, reference.seconds, frames, sampling)[1][0]


def engine_rate(engine: Path, device: str, ref: Path, requests: int, batches: list[int]) -> dict:
    """The engine's own audio seconds per second on the load's requests, rendered in this process
    in batches of each size (no HTTP, no queue), and the matmul floor of the same rows."""
    import torch

    from bench.engine_bench import loop_flops, matmul_tflops
    from indicf5.config import SamplingConfig
    from indicf5.synth import Synthesizer

    synth = Synthesizer.from_engine(engine, device=device)
    rows = [
        synth.prepare(SENTENCES[i % len(SENTENCES)], ref, REF_TEXT, SamplingConfig(seed=i)).rows[0]
        for i in range(requests)
    ]
    audio_s = sum(r.frames - r.ref_frames for r in rows) * synth.mel_config.hop_length / synth.mel_config.sample_rate
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for batch in batches:
        synth.render(rows[:batch])  # warm
        sync()
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            synth.render(rows[i : i + batch])
        sync()
        out[batch] = audio_s / (time.perf_counter() - start)
    if device.startswith("cuda"):
        config = synth.model.dit.config if hasattr(synth.model, "dit") else synth.model.config
        flops = sum(loop_flops(config, r.frames, 2, SamplingConfig().nfe) for r in rows)
        out["matmul_floor_audio_s_per_s"] = audio_s / (flops / (matmul_tflops("cuda") * 1e12))
    return out


def add_voice(url: str, audio: Path, text: str, name: str = "load") -> str:
    if not any(v["name"] == name for v in httpx.get(f"{url}/v1/voices").json()):
        with audio.open("rb") as f:
            r = httpx.post(f"{url}/v1/voices", data={"name": name, "ref_text": text}, files={"audio": (audio.name, f)})
        r.raise_for_status()
    return name


def synthetic_engine(tmp: Path, size: str, backend: str, dtype: str, device: str, flags: dict) -> Path:
    from safetensors.torch import save_file

    from indicf5.backends import engine_from_checkpoint
    from indicf5.checkpoint import EXPORT_VOCODER
    from indicf5.config import ModelConfig
    from indicf5.synthetic import make_synthetic, random_vocoder

    if size == "small":
        return engine_from_checkpoint(make_synthetic(tmp / "IndicF5"), tmp / "build", backend, dtype, device, flags)
    c = ModelConfig()
    snapshot = make_synthetic(
        tmp / "IndicF5",
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        text_dim=c.text_dim,
        conv_layers=c.conv_layers,
        ff_mult=c.ff_mult,
    )
    engine = engine_from_checkpoint(snapshot, tmp / "build", backend, dtype, device, flags)
    save_file(random_vocoder(0, dim=512, hidden=1536, layers=8), str(engine / EXPORT_VOCODER))  # Vocos' real size
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--engine", type=Path, help="engine directory to serve")
    target.add_argument(
        "--synthetic", action="store_true", help="build a synthetic engine (random weights) and serve it"
    )
    target.add_argument("--url", help="a running server")
    p.add_argument(
        "--size",
        choices=["small", "indicf5"],
        default="small",
        help="with --synthetic: the tests' small sizes, or IndicF5's dims with a full-size vocoder",
    )
    p.add_argument("--backend", default="eager", help="with --synthetic")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="with --synthetic")
    p.add_argument("--voice", help="with --url: a voice the server has (default: add the synthetic reference)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="one server per value (not with --url)")
    p.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long")
    p.add_argument("--device", action="append", help="passed to indicf5 serve")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument(
        "--flags", type=json.loads, default={}, help='with --synthetic: build flags as JSON, e.g. {"precision": "fp8"}'
    )
    p.add_argument(
        "--engine-rate", action="store_true", help="also the engine's own throughput on the same rows, in this process"
    )
    p.add_argument("--ttfb", action="store_true", help="also the first-byte times of a long text, on the last server")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = tmp / "reference.wav"
        write_wav(ref, reference_clip(seconds=3.0), 24_000)
        results = {}
        if args.url:
            voice = args.voice or add_voice(args.url, ref, REF_TEXT)
            results["server"] = run_load(args.url, voice, args.requests, args.concurrency, args.max_seconds)
        else:
            engine = args.engine
            if args.synthetic:
                engine = synthetic_engine(
                    tmp, args.size, args.backend, args.dtype, (args.device or ["cpu"])[0], args.flags
                )
            for i, max_batch in enumerate(args.max_batch):
                extra = ["--max-batch", str(max_batch), "--voices-dir", str(tmp / "voices")]
                for device in args.device or []:
                    extra += ["--device", device]
                with ServerProcess(engine, tmp / f"server-{max_batch}.log", *extra) as server:
                    voice = add_voice(server.url, ref, REF_TEXT)
                    results[f"max_batch={max_batch}"] = run_load(
                        server.url, voice, args.requests, args.concurrency, args.max_seconds
                    )
                    print(f"max_batch={max_batch}", json.dumps(results[f"max_batch={max_batch}"]), flush=True)
                    if args.ttfb and i == len(args.max_batch) - 1:
                        results["ttfb"] = ttfb(server.url, voice, first_chunk(ref))
                        print("ttfb", json.dumps(results["ttfb"]), flush=True)
            if args.engine_rate:
                results["engine"] = engine_rate(engine, (args.device or ["cpu"])[0], ref, args.requests, args.max_batch)
                print("engine", json.dumps(results["engine"]), flush=True)

    print(
        f"\n{args.requests} requests, {args.concurrency} clients"
        + (f", {args.size} {args.backend} {args.dtype}" if args.synthetic else "")
    )
    servers = {name: r for name, r in results.items() if name.startswith("max_batch=") or name == "server"}
    print(
        f"{'server':16} {'ok':>4} {'req/s':>7} {'audio s/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} "
        f"{'rows/batch':>10} {'captures':>8} {'engine s/s':>10} {'server/engine':>13} {'of floor':>8}  errors"
    )
    engine_rates = results.get("engine", {})
    floor = engine_rates.get("matmul_floor_audio_s_per_s")
    for name, r in servers.items():
        own = engine_rates.get(int(name.split("=")[1])) if name != "server" else None
        print(
            f"{name:16} {r['ok']:>4} {r['rps']:>7.2f} {r['audio_s_per_s']:>9.2f} {r['p50_ms']:>8.0f} "
            f"{r['p90_ms']:>8.0f} "
            f"{r['p99_ms']:>8.0f} {r['max_ms']:>8.0f} {r['rows_per_batch']:>10.2f} {r['captures_after_ready']:>8.0f} "
            f"{own or float('nan'):>10.2f} {r['audio_s_per_s'] / own if own else float('nan'):>13.2f} "
            f"{r['audio_s_per_s'] / floor if floor else float('nan'):>8.2f}  {r['errors'] or '-'}"
        )
    heads = [f"{stage + ' ms':>15}" for stage in STAGES] + [f"{'unstaged ms':>11}", f"{'http ms':>8}"]
    print(f"\n{'server':16} " + " ".join(heads))
    for name, r in servers.items():
        stage_ms, server_ms = r.get("stage_ms", {}), r.get("server_ms", float("nan"))
        unstaged = server_ms - sum(stage_ms.values())  # in the server, in no stage: the threads' hand-offs
        print(
            f"{name:16} "
            + " ".join(f"{stage_ms.get(stage, float('nan')):>15.1f}" for stage in STAGES)
            + f" {unstaged:>11.1f} {r['mean_ms'] - server_ms:>8.1f}"
        )
    if len(servers) > 1:
        names = list(servers)
        print(f"throughput {names[-1]} / {names[0]}: {servers[names[-1]]['rps'] / servers[names[0]]['rps']:.2f}x")
    if floor:
        print(f"matmul floor of the workload: {floor:.1f} audio s/s")
    if "ttfb" in results:
        t = results["ttfb"]
        print(
            f"long text: whole {t['whole_ms']:.0f} ms, stream's first byte {t['stream_first_byte_ms']:.0f} ms, "
            f"its first chunk alone {t['first_chunk_alone_ms']:.0f} ms "
            f"({t['stream_first_byte_ms'] / t['first_chunk_alone_ms']:.2f}x)"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
