"""`detransformer-edge bench`: the real agents and the real Mosquitto in an emulated home
(``detransformer_edge.testbed``), timed end to end as the voice assistant sees them.

* ``spec``: workloads, homes and the run matrix (pure);
* ``results``: aggregation, ratios, JSON and markdown (pure);
* ``client``: the timing client, run inside the broker's namespace;
* ``runner``: builds a home, starts broker + agents + client, drives the measurements;
* ``plots``: PNG figures from a results JSON (matplotlib, the ``bench`` extra).
"""
