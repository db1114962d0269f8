"""An exposed bus must be authenticated: CURVE keys admit clients, the rest get nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bus import keys as bus_keys
from bus.client import BusClient, Endpoints
from bus.schema import Token
from tests import harness


def test_non_loopback_endpoint_without_keys_is_refused():
    with pytest.raises(bus_keys.BusSecurityError, match="must be authenticated"):
        BusClient(Endpoints(pub="tcp://0.0.0.0:7701", sub="tcp://10.1.2.3:7702"), "t")
    result = subprocess.run([sys.executable, "-m", "bus.broker", "--bus-pub", "tcp://0.0.0.0:1",
                             "--bus-sub", "tcp://0.0.0.0:2"], cwd=harness.ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "bus.keys" in result.stderr


def test_keys_folder_must_be_complete(tmp_path):
    with pytest.raises(bus_keys.BusSecurityError, match="missing"):
        bus_keys.check(["tcp://127.0.0.1:1"], str(tmp_path))


async def test_curve_broker_admits_keyed_clients_only(tmp_path):
    keys = bus_keys.generate(str(tmp_path / "keys"))
    endpoints = Endpoints(pub=f"tcp://127.0.0.1:{harness.free_port()}",
                          sub=f"tcp://127.0.0.1:{harness.free_port()}", keys=str(keys))
    broker = harness.Proc([sys.executable, "-m", "bus.broker", "--bus-keys", str(keys)],
                          harness.bus_env(endpoints), tmp_path / "broker.log")
    try:
        async with harness.client(endpoints, ["token"]) as reader, harness.client(endpoints) as writer:
            writer.publish(Token(session="secure", text="sealed"))
            got = await harness.recv_until(reader, lambda m: True, 10)
            assert got.text == "sealed"  # type: ignore[attr-defined]
        intruder = BusClient(Endpoints(pub=endpoints.pub, sub=endpoints.sub), "intruder", ["token"])
        try:
            with pytest.raises(TimeoutError):
                await intruder.wait_connected(timeout=2)
        finally:
            intruder.close()
        assert "curve=True" in broker.output()
    finally:
        broker.stop()
