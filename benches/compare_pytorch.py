"""CZ-NCE: fused (Rust) vs composite (Rust, candle ops) vs PyTorch eager, forward+backward.

Run from the repository root (needs torch; uses cargo):

    python benches/compare_pytorch.py [--shapes 32x768,64x1536,...] [--reps 5] [--rounds 3]
        [--threads N] [--dtype f32|bf16|f16] [--device cpu|cuda] [--bench-bin PATH]

With `--device cuda` the Rust side is built with `--features cuda` and both sides run on GPU 0
(times stop after a device synchronisation). `--bench-bin` runs an already built
`cz_nce_timing` binary instead of `cargo bench` (for a GPU machine without a Rust toolchain).

It builds and runs `cargo bench --bench cz_nce_timing` (release), times the same loss in
PyTorch eager with the same number of threads (default: the number of cores, which is what
candle/rayon use), and prints Markdown tables. Rust and PyTorch alternate for `rounds` rounds of
`reps` timed runs each (after warm-ups) so both see the same machine load; the tables give the
median of the per-round medians and the overall minimum, all measured in this one invocation.
The Rust side runs candle's elementwise ops on the calling thread, as training does
(`mlctl::device::single_cpu_thread_pool`); `CANDLE_NUM_THREADS=2 python benches/...` gives
candle's own pool of elementwise workers back, for a comparison.
"""

import argparse
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F


def cz_nce(q, k, t=0.07, eps=1e-8):
    """ML-CTL CZ-NCE in plain PyTorch (what a user would write): positive not in the partition."""
    qn = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    kn = k / k.norm(dim=1, keepdim=True).clamp_min(eps)
    b = q.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=q.device)
    sim_out = qn @ kn.T / t
    sim_in = qn @ qn.T / t
    pos = sim_out.diagonal()
    logits = torch.cat([sim_out.masked_fill(eye, float("-inf")), sim_in.masked_fill(eye, float("-inf"))], 1)
    return (torch.logsumexp(logits, 1) - pos).mean()


# ML-CTL's training batches (32-256) and a large one, at the two common embedding widths.
DEFAULT_SHAPES = ",".join(f"{b}x{d}" for b in (32, 64, 256, 1024) for d in (768, 1536))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_torch(b, d, reps, dtype, device):
    torch.manual_seed(0)
    q = torch.randn(b, d, device=device).to(dtype).requires_grad_(True)
    k = (q.detach() + torch.randn(b, d, device=device).to(dtype)).requires_grad_(True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            cz_nce(q.float(), k.float()).item()

    def fwd_bwd():
        q.grad = None
        k.grad = None
        cz_nce(q.float(), k.float()).backward()

    out = {}
    for name, f in [("fwd", fwd), ("fwd_bwd", fwd_bwd)]:
        for _ in range(2):
            f()  # warm-up
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        out[f"{name}_ms"] = median(ts)
        out[f"{name}_min_ms"] = min(ts)
    return out


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bench-bin", default=None,
                    help="a built cz_nce_timing binary to run instead of `cargo bench`")
    args = ap.parse_args()
    load_before = os.getloadavg()

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    features = ["--features", "cuda"] if args.device == "cuda" else []
    bench_args = ["--shapes", args.shapes, "--reps", str(args.reps), "--dtype", args.dtype,
                  "--device", args.device]
    if args.bench_bin:
        cmd = [args.bench_bin, "--bench"] + bench_args
    else:
        cmd = ["cargo", "bench", *features, "--bench", "cz_nce_timing", "--"] + bench_args
    torch.set_num_threads(args.threads)
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    # Rust and PyTorch alternate, round by round, so that both see the same machine load;
    # the table reports the median of the per-round medians and the minimum of all runs.
    runs = {}  # (b, d, impl) -> list of per-round dicts
    threads = candle_workers = "?"
    for _ in range(args.rounds):
        # PyTorch's OpenMP workers keep spinning for a while after its last parallel region;
        # let them go idle so that they do not compete with the Rust process.
        time.sleep(1.0)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                x = json.loads(line)
                threads = x["threads"]
                candle_workers = x.get("candle_workers", "?")
                runs.setdefault((x["b"], x["d"], x["path"]), []).append(x)
        for b, d in shapes:
            runs.setdefault((b, d, "torch"), []).append(
                time_torch(b, d, args.reps, tdtype, args.device))

    def agg(b, d, impl):
        xs = runs[(b, d, impl)]
        out = {}
        for key in ["fwd", "fwd_bwd"]:
            out[key + "_ms"] = median([x[key + "_ms"] for x in xs])
            out[key + "_min_ms"] = min(x[key + "_min_ms"] for x in xs)
        return out

    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}; ", end="")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; threads: {args.threads} "
          f"(rayon {threads}, torch {torch.get_num_threads()}; candle elementwise pool workers "
          f"{candle_workers}); torch {torch.__version__}; "
          f"dtype {args.dtype}; {args.rounds} rounds x {args.reps} runs; "
          f"1-min load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}\n")
    rows = [(b, d, agg(b, d, "fused"), agg(b, d, "composite"), agg(b, d, "torch"))
            for b, d in shapes]
    for stat, suffix in [("median of the per-round medians", "_ms"), ("minimum", "_min_ms")]:
        print(f"{stat}:\n")
        print("| B | D | fused fwd | composite fwd | torch fwd | fused fwd+bwd | composite fwd+bwd "
              "| torch fwd+bwd | composite/fused | torch/fused |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for b, d, fu, co, t in rows:
            f, c, p = (x["fwd" + suffix] for x in (fu, co, t))
            fb, cb, pb = (x["fwd_bwd" + suffix] for x in (fu, co, t))
            print(f"| {b} | {d} | {f:.1f} ms | {c:.1f} ms | {p:.1f} ms | {fb:.1f} ms | {cb:.1f} ms "
                  f"| {pb:.1f} ms | {cb / fb:.2f}x | {pb / fb:.2f}x |")
        print()


if __name__ == "__main__":
    main()
