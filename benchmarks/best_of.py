"""Best-of-N CLIP reranking against best-of-1 on the shapes eval prompts of one category, the
same prompts and seeds (prompt i: seed i): `nanodiffusion eval --best-of N` reports single
objects; this runs either category, pairs being where reranking has room on the shipped models.

    python benchmarks/best_of.py [MODEL=shapes-unclip] [--category pair] [--n 100] [--best-of 8]
"""
import argparse
import json

import nanodiffusion
from nanodiffusion.eval.report import eval_prompts, fidelity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="shapes-unclip")
    ap.add_argument("--category", choices=["single", "pair"], default="pair")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--best-of", type=int, default=8)
    a = ap.parse_args()
    pipe = nanodiffusion.load(a.model)
    prompts = eval_prompts(a.n)
    prompts = prompts[:a.n] if a.category == "single" else prompts[a.n:]
    one = fidelity(pipe, prompts)["accuracy"]
    best = fidelity(pipe, prompts, best_of=a.best_of)["accuracy"]
    print(json.dumps({"model": a.model, "category": a.category, "n": a.n,
                      f"best_of_{a.best_of}": best, "best_of_1": one}))


if __name__ == "__main__":
    main()
