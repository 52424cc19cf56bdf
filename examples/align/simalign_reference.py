"""SimAlign's alignments and AERs with a local model, as references for the `align` example.

Runs SimAlign (PyPI `simalign`, on the CPU) on `source ||| target` files for argmax ("inter"),
itermax and match ("mwmf"), in both token types (`bpe`, SimAlign's default, and `word`), from one
encoder pass per pair and token type as SimAlign does. Writes one Pharaoh file (0-based `i-j`)
per set, token type and method, prints AERs against the gold files and the wall and CPU time
(all threads) of each run (all three methods together).

    pip install simalign torch transformers
    python examples/align/simalign_reference.py --model DIR --layer 8 \
        --data tests/fixtures/align --sets roen jaen --out tests/fixtures/align/simalign_e5
    python examples/align/simalign_reference.py --model tests/fixtures/tiny_bert --layer 2 \
        --sets roen --max-words 25 --max-pairs 40 --out tests/fixtures/align/simalign_tiny

Words are separated by ASCII spaces only, as the `align` example reads them (a KFTT line holds an
ideographic space that its gold counts as a word; Python's `str.split()` would drop it).
"""

import argparse
import json
import os
import sys
import time


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def parse_pair(line):
    src, tgt = line.split(" ||| ")
    return [w for w in src.split(" ") if w], [w for w in tgt.split(" ") if w]


def parse_gold(lines):
    """1-based `i-j` (sure) and `ipj` (possible) links, returned 0-based."""
    gold = []
    for line in lines:
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
    ap.add_argument("--max-pairs", type=int, help="only the first N pairs of each set")
    ap.add_argument("--max-words", type=int, help="only pairs with at most N words a side")
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
        lines = read_lines(os.path.join(args.data, f"{name}.src-tgt"))
        gold_lines = read_lines(os.path.join(args.data, f"{name}.gold"))
        assert len(lines) == len(gold_lines), name
        if args.max_words:
            keep = [k for k, line in enumerate(lines) if max(map(len, parse_pair(line))) <= args.max_words]
            lines, gold_lines = [lines[k] for k in keep], [gold_lines[k] for k in keep]
        lines, gold_lines = lines[: args.max_pairs], gold_lines[: args.max_pairs]
        if args.out and (args.max_words or args.max_pairs):
            # A subset: keep its inputs beside the alignments.
            os.makedirs(args.out, exist_ok=True)
            for ext, content in (("src-tgt", lines), ("gold", gold_lines)):
                with open(os.path.join(args.out, f"{name}.{ext}"), "w", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in content))
        pairs = [parse_pair(line) for line in lines]
        gold = parse_gold(gold_lines)
        assert len(pairs) == len(gold), name
        for token_type in args.token_types:
            aligner = SentenceAligner(
                model=args.model, token_type=token_type, matching_methods="mai",
                device="cpu", layer=args.layer,
            )
            start, cpu = time.perf_counter(), time.process_time()
            out = {m: [] for m in methods.values()}
            for src, tgt in pairs:
                links = aligner.get_word_aligns(src, tgt)
                for key, method in methods.items():
                    out[method].append(links[key])
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
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
            print(
                f"{name} {token_type:4} {len(pairs)} pairs, 3 methods: {seconds:.1f} s wall, {cpu:.1f} s CPU",
                flush=True,
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
