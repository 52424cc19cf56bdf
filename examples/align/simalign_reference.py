"""SimAlign's alignments and AERs with a local model, as references for the `align` example.

Runs SimAlign (PyPI `simalign`, on the CPU) on `source ||| target` files for argmax ("inter"),
itermax and match ("mwmf"), in both token types (`bpe`, SimAlign's default, and `word`), from one
encoder pass per pair and token type as SimAlign does. Writes one Pharaoh file (0-based `i-j`)
per set, token type and method, prints AERs against the gold files and the wall time of each
run (all three methods together).

    pip install simalign torch transformers
    python examples/align/simalign_reference.py --model DIR --layer 8 \
        --data tests/fixtures/align --sets roen jaen --out tests/fixtures/align/simalign_e5

Words are separated by ASCII spaces only, as the `align` example reads them (a KFTT line holds an
ideographic space that its gold counts as a word; Python's `str.split()` would drop it).
"""

import argparse
import json
import os
import sys
import time


def read_pairs(path):
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            src, tgt = line.rstrip("\n").split(" ||| ")
            pairs.append(([w for w in src.split(" ") if w], [w for w in tgt.split(" ") if w]))
    return pairs


def read_gold(path):
    """1-based `i-j` (sure) and `ipj` (possible) links, returned 0-based."""
    gold = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            sure, possible = set(), set()
            for link in line.split():
                sep = "p" if "p" in link else "-"
                i, j = link.split(sep)
                pair = (int(i) - 1, int(j) - 1)
                possible.add(pair)
                if sep == "-":
                    sure.add(pair)
            gold.append((sure, possible))
    return gold


def aer(predicted, gold):
    a = s = a_s = a_p = 0
    for links, (sure, possible) in zip(predicted, gold):
        links = set(links)
        a += len(links)
        s += len(sure)
        a_s += len(links & sure)
        a_p += len(links & possible)
    return 1.0 - (a_s + a_p) / (a + s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--data", default="tests/fixtures/align", help="folder with SET.src-tgt, SET.gold")
    ap.add_argument("--sets", nargs="+", default=["roen", "jaen"])
    ap.add_argument("--token-types", nargs="+", default=["bpe", "word"])
    ap.add_argument("--out", help="folder for SET.TOKEN_TYPE.METHOD Pharaoh files")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import simalign
    import torch
    import transformers
    from simalign import SentenceAligner

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"simalign {getattr(simalign, '__version__', '0.4')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, layer {args.layer}",
        file=sys.stderr,
    )
    methods = {"inter": "argmax", "itermax": "itermax", "mwmf": "match"}
    results = {}
    for name in args.sets:
        pairs = read_pairs(os.path.join(args.data, f"{name}.src-tgt"))
        gold = read_gold(os.path.join(args.data, f"{name}.gold"))
        assert len(pairs) == len(gold), name
        for token_type in args.token_types:
            aligner = SentenceAligner(
                model=args.model, token_type=token_type, matching_methods="mai",
                device="cpu", layer=args.layer,
            )
            start = time.perf_counter()
            out = {m: [] for m in methods.values()}
            for src, tgt in pairs:
                links = aligner.get_word_aligns(src, tgt)
                for key, method in methods.items():
                    out[method].append(links[key])
            seconds = time.perf_counter() - start
            for method, predicted in out.items():
                score = aer(predicted, gold)
                results[f"{name} {token_type} {method}"] = round(score, 4)
                print(f"{name} {token_type:4} {method:7} AER {score:.4f}", flush=True)
                if args.out:
                    os.makedirs(args.out, exist_ok=True)
                    path = os.path.join(args.out, f"{name}.{token_type}.{method}")
                    with open(path, "w", encoding="utf-8") as f:
                        for links in predicted:
                            f.write(" ".join(f"{i}-{j}" for i, j in sorted(links)) + "\n")
            print(f"{name} {token_type:4} {len(pairs)} pairs, 3 methods: {seconds:.1f} s", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
