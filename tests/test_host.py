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


async def test_a_replacement_keeps_unchanged_models_and_drops_the_others():
    """A re-placement rebuilds only models whose weights change: unchanged models stay the same
    objects, and models no longer named are dropped."""
    from detransformer_edge.parallel.plan import DeviceWeights

    cat = tiny_catalog()
    a, b = cat.names[0], cat.names[1]
    hub = MemoryHub()
    async with hub.transport("dev0") as t:
        host = ModelHost(t, cat)
        try:
            whole_a = DeviceWeights(True, (), tuple(range(len(cat.get(a).config().layer_kinds))), ())
            await host.assign(1, {a: DeviceWeights(True, (), (0,), ()), b: DeviceWeights(True, (), (0,), ())})
            kept_b, old_a = host.held[b], host.held[a]
            await host.assign(2, {a: whole_a, b: DeviceWeights(True, (), (0,), ())})
            assert host.held[b] is kept_b and host.held[a] is not old_a and host.held[a].weights == whole_a
            assert host.ready and host.version == 2
            await host.assign(3, {a: whole_a})
            assert set(host.held) == {a}
        finally:
            await host.close()
