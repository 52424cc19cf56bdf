"""BERT encoder: mlctl (Rust, candle) vs transformers' BertModel in PyTorch eager, on the CPU.

Run from the repository root (needs torch and transformers; uses cargo):

    python benches/compare_encoder.py [--shapes embedded,e5-small,mbert] [--modes fwd,train]
        [--reps 3] [--rounds 2] [--threads 2] [--paths fused] [--device cpu|cuda] [--bench-bin PATH]

With `--device cuda` both sides run on GPU 0 (the Rust side built with `--features cuda`), and
each timing stops after a device synchronisation.

Shapes (random weights, every hidden state returned, every other sequence padded to 3/4):
  mbert     12 layers, H 768, 12 heads, I 3072, vocab 119547, B 8,  L 128
  e5-small  12 layers, H 384, 12 heads, I 1536, vocab 250037, B 32, L 64
  embedded   4 layers, H 128,  2 heads, I 512,  vocab 8000,   B 32, L 32

`fwd` is an inference pass (no gradients, dropout off). `train` is a training forward (dropout
0.1 on), the backward of `mean(h[1]) + mean(h[L])` and one AdamW step over every parameter.

Paths (`--paths`): `fused` and `composite` train every parameter densely, as PyTorch's `AdamW`
does, and are compared with the same PyTorch model. `frozen` fixes the embedding layer
(PyTorch: `model.embeddings.requires_grad_(False)`); `sparse` updates the word-embedding table
lazily, row by row (PyTorch: `nn.Embedding(sparse=True)` with `SparseAdam` for the table,
`AdamW` for the rest). These two are extra rows, not the like-for-like comparison.

The Rust side is `cargo bench --bench encoder_timing` (release; `--paths fused,composite` adds
the composite twins of the fused CPU ops). Rust and PyTorch alternate, round by round, with the
same number of threads, so that both see the same machine load; the table gives the median of the
per-round medians, in sequences per second, and mlctl / PyTorch.
"""

import argparse
import json
import os
import platform
import subprocess
import time

import torch
import transformers

SHAPES = {
    # name: (layers, hidden, heads, intermediate, vocab, batch, seq_len)
    "mbert": (12, 768, 12, 3072, 119547, 8, 128),
    "e5-small": (12, 384, 12, 1536, 250037, 32, 64),
    "embedded": (4, 128, 2, 512, 8000, 32, 32),
}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def inputs(vocab, b, l):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, l), generator=g)
    mask = torch.ones(b, l, dtype=torch.long)
    for i in range(1, b, 2):
        mask[i, 3 * l // 4:] = 0
    return ids, mask


TORCH_VARIANT = {"fused": "dense", "composite": "dense", "explicit": "dense", "frozen": "frozen",
                 "sparse": "sparse"}


class Optimizers:
    """Several optimizers stepped as one."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def time_torch(name, modes, reps, variant="dense", device="cpu"):
    layers, hidden, heads, inter, vocab, b, l = SHAPES[name]
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=inter)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    if variant == "frozen":
        model.embeddings.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    elif variant == "sparse":
        table = model.embeddings.word_embeddings
        table.sparse = True
        rest = [p for p in model.parameters() if p is not table.weight]
        opt = Optimizers(torch.optim.SparseAdam([table.weight], lr=1e-5),
                         torch.optim.AdamW(rest, lr=1e-5))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.to(device)
    ids, mask = (t.to(device) for t in inputs(vocab, b, l))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd():
        model.eval()
        with torch.no_grad():
            model(ids, attention_mask=mask, output_hidden_states=True)

    def train():
        model.train()
        h = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        (h[1].mean() + h[-1].mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for mode in modes:
        f = {"fwd": fwd, "train": train}[mode]
        for _ in range(2):
            f()  # warm-up
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        out[mode] = median(ts)
    return out, model.config._attn_implementation


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
    ap.add_argument("--shapes", default="embedded,e5-small,mbert")
    ap.add_argument("--modes", default="fwd,train")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="fused")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bench-bin", default=None,
                    help="a built encoder_timing binary to run instead of `cargo bench`")
    args = ap.parse_args()
    t_start = time.time()
    load_before = os.getloadavg()
    shapes = args.shapes.split(",")
    modes = args.modes.split(",")
    paths = args.paths.split(",")

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    bench_args = ["--shapes", args.shapes, "--modes", args.modes, "--reps", str(args.reps),
                  "--paths", args.paths, "--device", args.device]
    features = ["--features", "cuda"] if args.device == "cuda" else []
    if args.bench_bin:
        cmd = [args.bench_bin, "--bench"] + bench_args
    else:
        cmd = ["cargo", "bench"] + features + ["--bench", "encoder_timing", "--"] + bench_args
    torch.set_num_threads(args.threads)

    runs = {}  # (shape, mode, impl) -> per-round ms
    attn = "?"
    for _ in range(args.rounds):
        # PyTorch's OpenMP workers spin for a while after its last parallel region; let them
        # go idle so that they do not compete with the Rust process.
        time.sleep(1.0)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                x = json.loads(line)
                runs.setdefault((x["shape"], x["mode"], x["path"]), []).append(x["ms"])
        for name in shapes:
            for variant in sorted({TORCH_VARIANT[p] for p in paths}):
                # The variants differ in training only.
                vmodes = modes if variant == "dense" else [m for m in modes if m == "train"]
                if not vmodes:
                    continue
                out, attn = time_torch(name, vmodes, args.reps, variant, args.device)
                for mode, ms in out.items():
                    runs.setdefault((name, mode, "torch-" + variant), []).append(ms)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; threads: {args.threads}; "
          f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention: {attn}); {args.rounds} rounds x {args.reps} runs; "
          f"1-min load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
          f"took {time.time() - t_start:.0f} s\n")
    print("| workload | path | mlctl | PyTorch | mlctl / PyTorch | per-round ratios, min-max |")
    print("|---|---|---|---|---|---|")
    for name in shapes:
        layers, hidden, _, _, vocab, b, l = SHAPES[name]
        for mode in modes:
            what = "forward" if mode == "fwd" else "train step"
            for p in paths:
                variant = TORCH_VARIANT[p]
                if mode == "fwd" and (variant != "dense" or p == "explicit"):
                    continue  # the same forward as `fused`
                theirs_ms, ours_ms = runs[(name, mode, "torch-" + variant)], runs[(name, mode, p)]
                t = b * 1e3 / median(theirs_ms)
                ours = b * 1e3 / median(ours_ms)
                ratios = [th / o for th, o in zip(theirs_ms, ours_ms)]
                print(f"| {name} ({layers} layers, H {hidden}, vocab {vocab}), {what}, B={b}, "
                      f"L={l} | {p} | {ours:.1f} seq/s | {t:.1f} seq/s | {ours / t:.2f}x | "
                      f"{min(ratios):.2f}-{max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
