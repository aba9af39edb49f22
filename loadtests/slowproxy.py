"""A reverse proxy that makes a healthy worker slow: it delays each completion's response and every
streamed line, and passes /health and /metrics through at full speed (a slow worker still looks healthy,
which is the case a gateway has to notice from observed latency). Loopback only.

    python -m loadtests.slowproxy --upstream http://127.0.0.1:8101 --port 8201 --delay-s 0.5 --per-chunk-s 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def create_app(upstream: str, delay_s: float, per_chunk_s: float) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=httpx.Timeout(300, connect=5))

    async def proxy(request: Request):
        path = request.url.path
        slow = path.startswith("/v1/") and request.method == "POST"
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP | {"host"}}
        if slow and delay_s:
            await asyncio.sleep(delay_s)
        req = client.build_request(request.method, path, params=request.query_params, content=body, headers=headers)
        resp = await client.send(req, stream=True)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        if not (slow and "text/event-stream" in resp.headers.get("content-type", "")):
            content = await resp.aread()
            await resp.aclose()
            if slow and per_chunk_s and resp.status_code == 200:  # as slow as the streamed form would be
                try:
                    await asyncio.sleep(per_chunk_s * json.loads(content)["usage"]["completion_tokens"])
                except (ValueError, KeyError, TypeError):
                    pass
            return Response(content, status_code=resp.status_code, headers=out_headers)

        async def lines():
            try:
                async for line in resp.aiter_lines():
                    if line:
                        if per_chunk_s:
                            await asyncio.sleep(per_chunk_s)
                        yield line + "\n\n"
            finally:
                await resp.aclose()

        return StreamingResponse(lines(), status_code=resp.status_code, headers=out_headers)

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST"])])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-s", type=float, default=0.5)
    ap.add_argument("--per-chunk-s", type=float, default=0.05)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(args.upstream, args.delay_s, args.per_chunk_s), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
