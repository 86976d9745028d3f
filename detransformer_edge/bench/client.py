"""The benchmark's voice-assistant client: run inside the home (the broker's namespace), it
sends requests through ``HomeClient`` (``detransformer/<cluster>/request``) and times each from
the publish to the final reply.

Driven over pipes by the runner: one JSON job per stdin line, one JSON answer per stdout line.

  job:    {"op": "embed"|"generate", "input": ..., "params": {...}, "timeout_s": 120}
  answer: {"ok": true, "latency_s": 0.41, "result": {...}}  or  {"ok": false, "error": "..."}

``python -m detransformer_edge.bench.client --host 10.77.0.2 --port 1883 --cluster bench``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any


async def serve(host: str, port: int, cluster: str) -> int:
    from detransformer_edge.protocol.client import HomeClient
    from detransformer_edge.protocol.codec import ProtocolError

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with HomeClient(host, port, cluster, client_id=f"bench-{uuid.uuid4().hex[:8]}") as home:
        print(json.dumps({"ok": True, "ready": True}), flush=True)
        while line := await reader.readline():
            job = json.loads(line)
            timeout = job.get("timeout_s", 120.0)
            t0 = time.perf_counter()
            try:
                reply = await home.request(job["op"], job["input"], job.get("params", {}), timeout=timeout)
            except TimeoutError:
                answer: dict[str, Any] = {"ok": False, "error": f"no reply within {timeout} s"}
            except ProtocolError as exc:  # a job the request schema refuses: never sent
                answer = {"ok": False, "error": str(exc)}
            else:
                latency = time.perf_counter() - t0
                if reply.error is not None:
                    error = {"code": reply.error.code, "message": reply.error.message}
                    answer = {"ok": False, "error": error, "latency_s": latency}
                else:
                    body = dict(reply.result or {})
                    result = {k: v for k, v in body.items() if k not in ("embeddings", "text")}
                    answer = {"ok": True, "latency_s": latency, "result": result}
                    if job.get("want_embeddings") and "embeddings" in body:
                        answer["embeddings"] = body["embeddings"]
            print(json.dumps(answer), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--cluster", required=True)
    args = p.parse_args(argv)
    return asyncio.run(serve(args.host, args.port, args.cluster))


if __name__ == "__main__":
    sys.exit(main())
