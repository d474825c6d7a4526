"""`icd serve` latency: seconds of an edit through the HTTP API on a photo inverted once (`POST /edit`, the decode
alone) against a whole edit through it (`POST /invert` of a new inversion, then `POST /edit`), in the same run.

    python benchmarks/serve_latency.py                                  # the embedded model, PyTorch on the CPU
    python benchmarks/serve_latency.py --threads 1 --repeats 30 --out serve-latency.json

The app runs in this process under uvicorn (a thread, a free port on 127.0.0.1) and is called over HTTP with one
kept-alive connection, as the page calls it. Every edit gets a target it has not seen; every whole edit a seed
it has not seen, so its inversion is computed, not found in the server's cache. Each row: the median and 90th
percentile of the round trip (what a client waits) and of the model's own seconds (what the server reports).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SOURCE = "a red circle on a blue background"
COLOURS = ("yellow", "green", "purple", "orange", "white", "black", "pink", "cyan")
SHAPES = ("circle", "square", "triangle")


def targets():
    for colour, shape in itertools.cycle(itertools.product(COLOURS, SHAPES)):
        yield f"a {colour} {shape} on a blue background"


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


class Client:
    """JSON calls over one HTTP/1.1 connection."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {answer.get('error')}")
        return answer, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--method", choices=["auto", "p2p", "swap"], default="auto", help="auto: the recipe's")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("serve-latency.json"), help="where the JSON report goes")
    args = parser.parse_args()
    import torch

    from icdcli import ICDEditPipeline
    from icdcli.serve import ServerThread, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = ICDEditPipeline.from_pretrained(device="cpu", backend=args.backend)
    photo = base64.b64encode(EXAMPLE.read_bytes()).decode()
    names = targets()
    with ServerThread(create_app(pipe)) as server:
        client = Client(server.url)

        def invert(seed: int) -> tuple[dict[str, Any], float]:
            return client.post("/invert", {"image": photo, "src": SOURCE, "seed": seed})

        def edit(inversion: str) -> tuple[dict[str, Any], float]:
            return client.post("/edit", {"inversion": inversion, "tgt": next(names), "method": args.method})

        kept = invert(0)[0]["inversion"]
        for seed in range(1, 4):  # warm-up: first calls allocate
            edit(invert(seed)[0]["inversion"])
            edit(kept)
        decode, decode_model, whole, whole_model = [], [], [], []
        for call in range(args.repeats):  # interleaved, so both see the same load of the machine
            answer, seconds = edit(kept)
            decode.append(seconds)
            decode_model.append(answer["seconds"])
            inverted, invert_seconds = invert(1000 + call)
            assert not inverted["cached"]
            answer, seconds = edit(inverted["inversion"])
            whole.append(invert_seconds + seconds)
            whole_model.append(inverted["seconds"] + answer["seconds"])
        method = answer["record"]["method"]
    report = {
        "model": pipe.model.info.name, "backend": pipe.backend, "threads": torch.get_num_threads(), "method": method,
        "repeats": args.repeats,
        "rows": [
            {"call": "POST /edit on the kept inversion", "round_trip": quantiles(decode),
             "model": quantiles(decode_model)},
            {"call": "POST /invert (new) + POST /edit", "round_trip": quantiles(whole),
             "model": quantiles(whole_model)},
        ],
        "decode_share": round(statistics.median(decode) / statistics.median(whole), 3),
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['model']} on {report['backend']} (CPU, {report['threads']} threads), {method}, "
          f"{args.repeats} calls each; median (p90) seconds")  # fmt: skip
    print(f"  {'call':34s} {'round trip':>18s} {'model':>18s}")
    for row in report["rows"]:
        trip, model = row["round_trip"], row["model"]
        shown = [f"{kind['median']:8.4f} ({kind['p90']:.4f})" for kind in (trip, model)]
        print(f"  {row['call']:34s} {shown[0]:>18s} {shown[1]:>18s}")
    print(f"  the edit on the kept inversion takes {report['decode_share']:.0%} of a whole edit; JSON: {args.out}")


if __name__ == "__main__":
    main()
