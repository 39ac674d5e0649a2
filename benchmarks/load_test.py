"""Load test of a running server: C clients x R requests to /v1/images/generations at once,
then every completed request again, one at a time, to check its bytes equal the concurrent
answer (a seed must give the same image whatever else runs). The server's resident memory
(AUTOMATIC1111's /sdapi/v1/memory) is read before, after the concurrent part, and at the end.

    nanodiffusion serve --models-dir models &
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model tiny
"""
import argparse
import statistics
import threading
import time

import httpx


def _args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--requests", type=int, default=5, help="per client")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", default=None, help="WxH (default: the model's)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600)
    return ap.parse_args()


def _body(args, client, i):
    body = {"prompt": f"load test {client} {i % 2}", "seed": 1000 * client + i,
            "response_format": "b64_json"}
    for key, value in (("model", args.model), ("steps", args.steps), ("size", args.size)):
        if value is not None:
            body[key] = value
    return body


def _post(http, args, body):
    t0 = time.perf_counter()
    r = http.post(args.url.rstrip("/") + "/v1/images/generations", json=body)
    return r, time.perf_counter() - t0


def _client(args, http, client, results):
    for i in range(args.requests):
        body = _body(args, client, i)
        r, dt = _post(http, args, body)
        image = r.json()["data"][0]["b64_json"] if r.status_code == 200 else None
        results.append({"body": body, "status": r.status_code, "latency": dt, "image": image})


def _rss(http, args):
    return http.get(args.url.rstrip("/") + "/sdapi/v1/memory").json()["ram"]["used"]


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    args = _args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results, rss = [], []
    with httpx.Client(timeout=args.timeout, headers=headers,
                      limits=httpx.Limits(max_connections=args.clients * 2)) as http:
        _post(http, args, _body(args, 0, 0))  # the model loaded before the clock starts
        rss.append(_rss(http, args))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=_client, args=(args, http, c, results))
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss.append(_rss(http, args))
        done = [r for r in results if r["status"] == 200]
        mismatched = 0
        for r in done:  # sequential twins
            twin, _ = _post(http, args, r["body"])
            if twin.status_code != 200 or twin.json()["data"][0]["b64_json"] != r["image"]:
                mismatched += 1
        rss.append(_rss(http, args))
    _report(results, done, mismatched, wall)
    print("server RSS MB: loaded {:.0f}, after the load {:.0f}, after the twins {:.0f}".format(
        *(r / 2**20 for r in rss)))
    return 1 if mismatched else 0


def _report(results, done, mismatched, wall):
    by_status = {}
    for r in results:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    print(f"requests: {len(results)} in {wall:.1f} s; by status: {by_status}")
    print(f"completed: {len(done)}, 429 (queue full): {by_status.get(429, 0)}")
    if done:
        lat = [r["latency"] for r in done]
        print("latency s: " + ", ".join(f"p{q} {_percentile(lat, q):.2f}" for q in (50, 90, 99))
              + f", mean {statistics.mean(lat):.2f}, max {max(lat):.2f}")
        print(f"throughput: {len(done) / wall:.2f} images/s")
    print(f"sequential twins equal: {len(done) - mismatched}/{len(done)}"
          + ("" if not mismatched else "  <-- MISMATCH"))


if __name__ == "__main__":
    raise SystemExit(main())
