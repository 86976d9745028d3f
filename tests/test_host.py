"""The model host's threads: model compute off the event loop, weight loading below its priority."""

import os
import threading

from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.host import LOADER_NICENESS, ModelHost
from detransformer_edge.transport.memory import MemoryHub


async def test_weights_load_on_a_lower_priority_thread_and_compute_on_its_own():
    hub = MemoryHub()
    async with hub.transport("dev0") as t:
        host = ModelHost(t, tiny_catalog())
        try:
            me = threading.get_native_id()
            loader = host.loader.submit(threading.get_native_id).result()
            compute = host.compute_pool.submit(threading.get_native_id).result()
            assert len({me, loader, compute}) == 3  # neither runs on the event loop's thread
            base = os.getpriority(os.PRIO_PROCESS, me)
            assert os.getpriority(os.PRIO_PROCESS, loader) == min(19, base + LOADER_NICENESS)
            assert os.getpriority(os.PRIO_PROCESS, compute) == base
            await host.assign(1, {})  # an empty placement loads nothing and is ready
            assert host.ready and host.version == 1
        finally:
            await host.close()
