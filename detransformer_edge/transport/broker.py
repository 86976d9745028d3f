"""A local MQTT broker for the demo and the tests: Mosquitto when installed, else the embedded
amqtt broker (pure Python, MQTT 3.1.1 only) in a thread with its own event loop.

    with local_broker() as broker:           # broker.host, broker.port, broker.kind
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from detransformer_edge.errors import DetransformerError

log = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(DetransformerError):
    """A local broker could not be started."""


@dataclass(frozen=True)
class LocalBroker:
    host: str
    port: int
    kind: str  # "mosquitto" | "amqtt"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def find_mosquitto() -> str | None:
    for path in MOSQUITTO_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("mosquitto")


def mosquitto_config(host: str, port: int) -> str:
    return (
        f"listener {port} {host}\n"
        # stay the user who started it (as the embedded broker does): a change of user would
        # clear the parent-death signal that stops it with its program
        f"user {getpass.getuser()}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"  # without it small fan-out copies wait ~40 ms (Nagle)
        "max_queued_messages 100000\n"  # QoS 0 bursts must not be dropped
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_this_thread() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when the thread that starts it
    exits (the demo killed without a chance to stop its broker must not leave the broker running).
    Resolved before the fork: the child only makes the one system call. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM.value)


@contextlib.contextmanager
def run_mosquitto(host: str = "127.0.0.1", port: int | None = None, binary: str | None = None,
                  workdir: Path | None = None) -> Iterator[LocalBroker]:
    binary = binary or find_mosquitto()
    if binary is None:
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
    port = port or free_port(host)
    with contextlib.ExitStack() as stack:
        wd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dte-mosquitto-")))
        conf = wd / "mosquitto.conf"
        conf.write_text(mosquitto_config(host, port))
        log_path = wd / "mosquitto.log"
        log_file = stack.enter_context(log_path.open("wb"))
        # started from the calling thread: it lives as long as that thread (callers hold it for the
        # broker's life: the main thread of a program, a test session)
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_this_thread())
        try:
            if not wait_for_port(host, port):
                raise BrokerError(f"mosquitto did not open {host}:{port}: {log_path.read_text(errors='replace')[-500:]}")
            yield LocalBroker(host, port, "mosquitto")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextlib.contextmanager
def run_amqtt(host: str = "127.0.0.1", port: int | None = None) -> Iterator[LocalBroker]:
    """The embedded amqtt broker in its own thread and event loop (serves any caller's loop)."""
    try:
        from amqtt.broker import Broker
    except ImportError:  # amqtt is in the `demo` extra only
        raise BrokerError("no MQTT broker to start here: install Mosquitto (apt-get install mosquitto) or "
                          "the embedded one (pip install 'detransformer-edge[demo]', amqtt)") from None
    port = port or free_port(host)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []
    holder: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            broker = Broker(config, loop=loop)
            await broker.start()
            holder["broker"] = broker

        try:
            loop.run_until_complete(boot())
        except Exception as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
    thread.start()
    started.wait(timeout=20)
    if failure:
        raise BrokerError(f"amqtt broker failed to start: {failure[0]!r}")
    if not wait_for_port(host, port):
        raise BrokerError(f"amqtt broker did not open {host}:{port}")
    try:
        yield LocalBroker(host, port, "amqtt")
    finally:
        broker = holder.get("broker")
        if broker is not None:
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@contextlib.contextmanager
def local_broker(prefer: str = "auto", host: str = "127.0.0.1") -> Iterator[LocalBroker]:
    """``auto``: Mosquitto when installed (much faster for activations), else amqtt."""
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise BrokerError(f"unknown broker {prefer!r}; use auto, mosquitto or amqtt")
    use_mosquitto = prefer == "mosquitto" or (prefer == "auto" and find_mosquitto() is not None)
    with (run_mosquitto(host) if use_mosquitto else run_amqtt(host)) as broker:
        yield broker
