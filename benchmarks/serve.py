"""`lora-tune serve` under load: requests/s and p50/p95 latency for 1, 4 and 16 concurrent clients, each request for
one of three adapters or the bare base in turn, against the same server generating one request at a time (swapping
the adapter per request, as a server without mixed batches must). Both modes take turns over several rounds.

    python benchmarks/serve.py --shape tiny        # tiny LLaMA shape, random weights
    python benchmarks/serve.py --shape smollm2     # real SmolLM2-135M weights (../shared)
"""
import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from train_throughput import HERE, SHARED, base_folder, tokenizer_of

from lora_tuner import AdapterPool
from lora_tuner.serve.openai_api import create_app

MODELS = ["a", "b", "c", "base"]
PROMPTS = [row["instruction"] for row in json.loads((SHARED / "data/alpaca_5000.json").read_text())[:64]]
MODES = {"mixed batches (lora-tune serve)": 16, "one request at a time, adapter swapped per request": 1}


def adapters(shape: str) -> list[Path]:
    """Three random r16 all-linear adapters (speed does not depend on the values)."""
    folder = HERE / ".cache" / "serve" / shape
    for seed, name in enumerate("abc"):
        if not (folder / name / "adapter_config.json").is_file():
            torch.manual_seed(seed)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder(shape)),
                                   LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                              init_lora_weights="gaussian"))
            model.save_pretrained(folder / name)
    return [folder / name for name in "abc"]


def serve(pool: AdapterPool, max_batch: int):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(pool, max_batch=max_batch), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"


def load(url: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    latencies, tokens, start = [], [], threading.Barrier(clients + 1)

    def client(number: int):
        with httpx.Client(timeout=600) as http:
            start.wait()
            for i in range(requests_each):
                n = number * requests_each + i
                body = {"model": MODELS[n % len(MODELS)], "prompt": PROMPTS[n % len(PROMPTS)],
                        "max_tokens": max_tokens, "temperature": 0}
                began = time.perf_counter()
                answer = http.post(url, json=body)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - began)
                tokens.append(answer.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement (split over clients)")
    args = parser.parse_args()
    pool = AdapterPool(str(base_folder(args.shape)), tokenizer=tokenizer_of(args.shape), max_loaded=3)
    for name, folder in zip("abc", adapters(args.shape)):
        pool.add(name, folder)
    runs = {(mode, clients): [] for mode in MODES for clients in (1, 4, 16)}
    for round_number in range(args.rounds):
        for mode, max_batch in (list(MODES.items())[::1 if round_number % 2 == 0 else -1]):  # alternate who leads
            server, thread, url = serve(pool, max_batch)
            load(url, 1, 2, args.max_tokens)  # warm-up
            for clients in (1, 4, 16):
                runs[mode, clients].append(load(url, clients, max(1, args.requests // clients), args.max_tokens))
                last = runs[mode, clients][-1]
                print(f"round {round_number + 1} {mode}, {clients} clients: {last['requests_per_s']:.2f} req/s, "
                      f"p50 {last['p50_s']:.2f} s, p95 {last['p95_s']:.2f} s", flush=True)
            server.should_exit = True
            thread.join()
    table = []
    print(f"\n{args.shape}, {torch.get_num_threads()} threads, {args.rounds} rounds, {args.max_tokens} new tokens per "
          "request, models a/b/c/base in turn; medians (min-max)")
    print(f"{'mode':52s} {'clients':>7s} {'req/s':>18s} {'p50 s':>8s} {'p95 s':>8s}")
    for (mode, clients), found in runs.items():
        row = {"mode": mode, "clients": clients, **{key: {"median": statistics.median(r[key] for r in found),
                                                          "min": min(r[key] for r in found),
                                                          "max": max(r[key] for r in found)} for key in found[0]}}
        table.append(row)
        rps = row["requests_per_s"]
        print(f"{mode:52s} {clients:7d} {rps['median']:6.2f} ({rps['min']:.2f}-{rps['max']:.2f}) "
              f"{row['p50_s']['median']:8.2f} {row['p95_s']['median']:8.2f}")
    ratios = {}
    for clients in (1, 4, 16):
        batched, alone = (next(r for r in table if r["mode"] == m and r["clients"] == clients) for m in MODES)
        ratios[clients] = batched["requests_per_s"]["median"] / alone["requests_per_s"]["median"]
    print("requests/s, mixed batches vs one at a time: " + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratios.items()))
    device = f"cpu-{os.cpu_count()}cores" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    out = HERE / "results" / f"serve-{device.replace(' ', '_')}-{args.shape}.json"
    out.write_text(json.dumps({"device": device, "shape": args.shape, "rounds": args.rounds,
                               "max_tokens": args.max_tokens, "requests": args.requests, "table": table,
                               "speedup_vs_one_at_a_time": ratios}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
