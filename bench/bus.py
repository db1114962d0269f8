"""Bus benchmark: 1 KB messages through the broker vs. a direct pyzmq PUB->SUB pair.

Publisher and subscriber are separate processes, as the actors are. Throughput: the publisher
sends as fast as it can, the subscriber times first to last message. Latency: one message every
``--interval-ms``, each carrying its send time (CLOCK_MONOTONIC is shared by all processes).
A third row times the real BusClient path (msgpack encode, validation, lanes) through the broker.

    .venv/bin/python bench/bus.py [--messages 200000] [--latency-messages 3000]

Goal (issue 2): broker throughput >= half of direct; broker p99 latency < 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.client import BusClient, Endpoints
from bus.schema import Token
from tests.harness import free_port

PAYLOAD = 1024
TOPIC = b"bench\0"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ----------------------------------------------------------------------------- subscriber side


def subscriber(endpoint: str, expect: int, mode: str) -> None:
    """Receive and print one JSON result line (run in its own process)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.rcvhwm = 0
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sock.connect(endpoint)
    print("ready", flush=True)
    latencies: list[float] = []
    count, first, last = 0, 0.0, 0.0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while count < expect and poller.poll(3000):
        _, body = sock.recv_multipart()
        now = time.perf_counter_ns()
        if count == 0:
            first = now
        last = now
        count += 1
        if mode == "latency":
            latencies.append((now - int.from_bytes(body[:8], "little")) / 1e6)
    result = {"received": count, "seconds": (last - first) / 1e9}
    if latencies:
        result |= {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                   "max_ms": max(latencies)}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- publisher side


def run_pair(pub_endpoint: str, sub_endpoint: str, direct: bool, mode: str, count: int,
             interval_ms: float) -> dict:
    sub = subprocess.Popen(
        [sys.executable, __file__, "--role", "sub", "--endpoint", sub_endpoint,
         "--expect", str(count), "--mode", mode],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = 0
    (pub.bind if direct else pub.connect)(pub_endpoint)
    time.sleep(0.5)  # subscriptions settle
    body = bytearray(PAYLOAD)
    if mode == "throughput":
        for _ in range(count):
            pub.send_multipart([TOPIC, body])
    else:
        next_at = time.perf_counter()
        for _ in range(count):
            next_at += interval_ms / 1000
            time.sleep(max(0.0, next_at - time.perf_counter()))  # no spinning: 2 cores only
            body[:8] = time.perf_counter_ns().to_bytes(8, "little")
            pub.send_multipart([TOPIC, body])
    out, _ = sub.communicate(timeout=120)
    pub.close(linger=0)
    ctx.term()
    return json.loads(out.strip().splitlines()[-1])


async def busclient_latency(endpoints: Endpoints, count: int, interval_ms: float) -> dict:
    """Latency of the real client path: Token messages with a 1 KB text through the broker."""
    async with BusClient(endpoints, "bench-sub", ["token"]) as sub, \
            BusClient(endpoints, "bench-pub") as pub:
        await pub.wait_connected()
        latencies = []
        lost = 0
        text = "x" * PAYLOAD
        for _ in range(count):
            sent = time.perf_counter_ns()
            pub.publish(Token(session="bench", text=text, index=sent))
            try:
                async with asyncio.timeout(2.0):
                    msg = await sub.recv()
            except TimeoutError:
                lost += 1
                continue
            latencies.append((time.perf_counter_ns() - msg.index) / 1e6)  # type: ignore[attr-defined]
            await asyncio.sleep(interval_ms / 1000)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies), "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="main")
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--mode", default="throughput")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--latency-messages", type=int, default=3000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    args = parser.parse_args()
    if args.role == "sub":
        subscriber(args.endpoint, args.expect, args.mode)
        return

    endpoints = Endpoints(pub=f"tcp://127.0.0.1:{free_port()}", sub=f"tcp://127.0.0.1:{free_port()}")
    broker = subprocess.Popen([sys.executable, "-m", "bus.broker", "--bus-pub", endpoints.pub,
                               "--bus-sub", endpoints.sub, "--log-level", "warning"], cwd=ROOT)
    try:
        time.sleep(0.5)
        direct_ep = f"tcp://127.0.0.1:{free_port()}"
        rows = {}
        for name, pub_ep, sub_ep, direct in (("direct", direct_ep, direct_ep, True),
                                             ("broker", endpoints.pub, endpoints.sub, False)):
            tput = run_pair(pub_ep, sub_ep, direct, "throughput", args.messages, 0)
            lat = run_pair(pub_ep, sub_ep, direct, "latency", args.latency_messages,
                           args.interval_ms)
            rows[name] = {
                "msgs_per_s": tput["received"] / tput["seconds"] if tput["seconds"] else 0.0,
                "received": tput["received"], "sent": args.messages,
                "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"],
            }
        client = asyncio.run(busclient_latency(endpoints, min(args.latency_messages, 2000),
                                               args.interval_ms))
    finally:
        broker.terminate()
        broker.wait(10)

    ratio = rows["broker"]["msgs_per_s"] / rows["direct"]["msgs_per_s"]
    print(f"\n1 KB messages, separate processes, {args.messages} for throughput, "
          f"{args.latency_messages} at {args.interval_ms} ms for latency\n")
    print(f"{'path':<22}{'msgs/s':>12}{'received':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, row in rows.items():
        print(f"{name:<22}{row['msgs_per_s']:>12,.0f}{row['received']:>12}"
              f"{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['max_ms']:>10.3f}")
    print(f"{'BusClient via broker':<22}{'':>12}{'':>12}{client['p50_ms']:>10.3f}"
          f"{client['p99_ms']:>10.3f}{client['max_ms']:>10.3f}")
    print(f"\nbroker/direct throughput ratio: {ratio:.2f} (goal >= 0.5); "
          f"broker p99 {rows['broker']['p99_ms']:.3f} ms (goal < 1 ms)")
    print(json.dumps({"bench": "bus", "direct": rows["direct"], "broker": rows["broker"],
                      "busclient": client, "throughput_ratio": ratio}))


if __name__ == "__main__":
    main()
