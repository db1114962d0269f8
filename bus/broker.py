"""The bus broker: an XSUB/XPUB proxy that every publisher and subscriber connects to.

Publishers connect to the XSUB side (``--bus-pub``), subscribers to the XPUB side (``--bus-sub``).
The proxy runs in libzmq's C loop, so forwarding costs no Python time per message. Subscriptions
flow upstream, so publishers only send what somebody wants. ``python -m bus.broker`` runs it alone.
"""

from __future__ import annotations

import signal
import sys
import threading

import structlog
import zmq

from bus import keys as bus_keys
from core import config, logs

# The broker buffers generously: lanes and their own high-water marks live in the clients.
BROKER_HWM = 200_000


def _bind_address(endpoint: str) -> str:
    """Bind where clients connect; ``localhost`` must become an address for zmq_bind."""
    return endpoint.replace("//localhost:", "//127.0.0.1:")


def serve(pub: str, sub: str, keys_dir: str = "", stop: threading.Event | None = None) -> None:
    """Run the proxy until ``stop`` is set (or forever)."""
    keys = bus_keys.check([pub, sub], keys_dir)
    log = structlog.get_logger()
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    control = ctx.socket(zmq.PAIR)
    control.bind(f"inproc://broker-control-{id(ctx)}")
    steer = ctx.socket(zmq.PAIR)
    steer.connect(f"inproc://broker-control-{id(ctx)}")
    for sock in (xsub, xpub):
        sock.sndhwm = BROKER_HWM
        sock.rcvhwm = BROKER_HWM
        sock.linger = 0
    auth = bus_keys.secure_server(ctx, [xsub, xpub], keys)
    try:
        xsub.bind(_bind_address(pub))
        xpub.bind(_bind_address(sub))
    except zmq.ZMQError as exc:
        raise SystemExit(f"broker: cannot bind {pub} / {sub}: {exc} (is another broker running?)") from None
    log.info("broker_listening", pub=pub, sub=sub, curve=keys is not None)

    def _watch() -> None:
        if stop is not None:
            stop.wait()
            steer.send(b"TERMINATE")

    watcher = threading.Thread(target=_watch, daemon=True)
    watcher.start()
    try:
        zmq.proxy_steerable(xsub, xpub, None, control)
    except zmq.ContextTerminated:
        pass
    finally:
        for sock in (xsub, xpub, control, steer):
            sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
        log.info("broker_stopped")


def main(argv: list[str] | None = None) -> int:
    settings = config.parse(["bus", "log"], argv, prog="python -m bus.broker",
                            description="Run the ZeroMQ bus broker (XSUB/XPUB proxy).")
    logs.configure("broker", json=settings.log_json, level=settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve(settings.bus_pub, settings.bus_sub, settings.bus_keys, stop)
    except bus_keys.BusSecurityError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
