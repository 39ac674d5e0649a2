"""Throughput of `nanodiffusion serve` with batching off and on (serve --max-batch): for each
bundled model and each --max-batch value, a server is started as a subprocess and driven by
1, 4 and 8 concurrent clients (threads, each with the official openai client), each asking
for the same fixed number of images one request after another; images/s for each, the
speed-up over --max-batch 1 at the same number of clients and over one client alone, and
whether each image's bytes equal those of its sequential twin (the same request answered by
the --max-batch 1 server, where every job runs alone), else the largest difference in /255.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_serving.py
    OMP_NUM_THREADS=1 nice python benchmarks/bench_serving.py --models shapes-lcm \\
        --max-batch 1,8 --clients 1,8 --per-client 4

The servers inherit OMP_NUM_THREADS: on a machine other programs share, give each fewer
threads than free cores (1 on a busy 2-core machine), or OpenMP's spinning threads wait on
each other's time slices and a request takes 100 times its time.
"""
import argparse
import base64
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
from PIL import Image

PROMPTS = ["a red circle", "a blue square on the left", "two green triangles",
           "a yellow star at the top", "a small purple circle", "a big orange square",
           "a cyan triangle at the bottom", "a white circle and a red square"]


def _args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shapes,shapes-lcm", help="bundled model names")
    ap.add_argument("--max-batch", default="1,4,8", help="serve --max-batch values (1 first)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--per-client", type=int, default=3, help="images each client asks for")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per setting (the median)")
    return ap.parse_args()


def _ints(text):
    return [int(x) for x in text.split(",")]


def _command():
    script = Path(sys.executable).parent / "nanodiffusion"
    if script.exists():
        return [str(script)]
    found = shutil.which("nanodiffusion")
    return [found] if found else [sys.executable, "-m", "nanodiffusion.cli"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(max_batch):
    """`nanodiffusion serve --max-batch N` on a free port -> (process, base URL, log)."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{port}-", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen([*_command(), "serve", "--port", str(port), "--max-batch",
                             str(max_batch), "--max-queue", "16"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.terminate()
            raise RuntimeError(f"serve did not answer within 120 s: see {log.name}")
        time.sleep(0.2)


def drive(url, model, clients, per_client):
    """`clients` threads, each asking for `per_client` images one after another ->
    (images/s, {(client, i): PNG bytes})."""
    out, errors = {}, []

    def client(c):
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                            timeout=600)
        for i in range(per_client):
            try:
                r = api.images.generate(model=model, prompt=PROMPTS[(c + i) % len(PROMPTS)],
                                        response_format="b64_json",
                                        extra_body={"seed": 1000 * c + i})
                out[c, i] = base64.b64decode(r.data[0].b64_json)
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    return clients * per_client / took, out


def compare(got, twins):
    """(images whose bytes equal their twins', all, largest channel difference in /255)."""
    same, worst = 0, 0
    for key, data in got.items():
        same += data == twins[key]
        a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int64)
        b = np.asarray(Image.open(io.BytesIO(twins[key])).convert("RGB"), dtype=np.int64)
        worst = max(worst, int(np.abs(a - b).max()))
    return same, len(got), worst


def measure(model, batches, client_counts, per_client, repeats):
    """{max_batch: {clients: (median images/s, PNGs of the first round)}} for one model. One
    server per --max-batch value, all up at once, and the rounds alternate between them, so
    that the load of a shared machine weighs on each alike."""
    servers = {mb: start(mb) for mb in batches}
    try:
        for _, url, _ in servers.values():  # loads the model; every batch size seen once
            drive(url, model, max(client_counts), 1)
        runs = {mb: {c: [] for c in client_counts} for mb in batches}
        for c in client_counts:
            for _ in range(repeats):
                for mb, (_, url, _) in servers.items():
                    runs[mb][c].append(drive(url, model, c, per_client))
    finally:
        for proc, _, log in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            os.unlink(log.name)
    return {mb: {c: (statistics.median(r[0] for r in rs), rs[0][1]) for c, rs in by.items()}
            for mb, by in runs.items()}


def report(model, results, client_counts):
    base = results[1]
    one = base[client_counts[0]][0]
    print(f"\n{model} (its default steps and sampler): median images/s; speed-up over "
          f"--max-batch 1 at the same clients, and over {client_counts[0]} client(s) with "
          f"--max-batch 1")
    print("| --max-batch | clients | images/s | vs batch 1 | vs one at a time | "
          "bytes = sequential twin | max diff /255 |")
    print("|---|---|---|---|---|---|---|")
    for mb, by_clients in results.items():
        for c in client_counts:
            ips, pngs = by_clients[c]
            same, total, worst = compare(pngs, base[c][1])
            print(f"| {mb} | {c} | {ips:.2f} | {ips / base[c][0]:.2f}x | {ips / one:.2f}x | "
                  f"{same}/{total} | {worst} |", flush=True)


def main():
    args = _args()
    batches, client_counts = _ints(args.max_batch), _ints(args.clients)
    if batches[0] != 1:
        raise SystemExit("--max-batch must start with 1 (the sequential twins)")
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{args.per_client} images per client, median of {args.repeats} rounds",
          flush=True)
    for model in args.models.split(","):
        results = measure(model, batches, client_counts, args.per_client, args.repeats)
        report(model, results, client_counts)


if __name__ == "__main__":
    main()
