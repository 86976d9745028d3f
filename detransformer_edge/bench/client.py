"""The benchmark's voice-assistant client: run inside the home (the broker's namespace), it
publishes requests to ``detransformer/<cluster>/request`` and times each from the publish to
the final reply.

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
    import aiomqtt

    reply_to = f"detransformer/{cluster}/replies/bench-{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}

    async def listen(client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            t = time.perf_counter()
            try:
                body = json.loads(msg.payload)
            except ValueError:
                continue
            if not isinstance(body, dict) or ("result" not in body and "error" not in body):
                continue  # streamed token events
            fut = pending.pop(str(body.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result((t, body))

    async with aiomqtt.Client(host, port, identifier=f"bench-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(reply_to, qos=1)
        listener = asyncio.create_task(listen(client))
        try:
            print(json.dumps({"ok": True, "ready": True}), flush=True)
            while line := await reader.readline():
                job = json.loads(line)
                rid = f"b{uuid.uuid4().hex[:10]}"
                fut: asyncio.Future[tuple[float, dict[str, Any]]] = loop.create_future()
                pending[rid] = fut
                req = {"id": rid, "reply_to": reply_to, "op": job["op"], "input": job["input"],
                       "params": job.get("params", {})}
                t0 = time.perf_counter()
                await client.publish(f"detransformer/{cluster}/request", json.dumps(req), qos=1)
                try:
                    t1, body = await asyncio.wait_for(fut, job.get("timeout_s", 120.0))
                except TimeoutError:
                    pending.pop(rid, None)
                    answer: dict[str, Any] = {"ok": False, "error": f"no reply within {job.get('timeout_s', 120.0)} s"}
                else:
                    if "error" in body:
                        answer = {"ok": False, "error": body["error"], "latency_s": t1 - t0}
                    else:
                        result = {k: v for k, v in body["result"].items() if k not in ("embeddings", "text")}
                        answer = {"ok": True, "latency_s": t1 - t0, "result": result}
                        if job.get("want_embeddings") and "embeddings" in body["result"]:
                            answer["embeddings"] = body["result"]["embeddings"]
                print(json.dumps(answer), flush=True)
        finally:
            listener.cancel()
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
