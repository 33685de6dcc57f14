"""An OpenAI-compatible upstream for heavy-input tests, run as its own process.

    python -m tests.integration.bulk_upstream PORT_FILE

Chat completions only. A whole answer is one short message with usage; a stream sends
`EVENTS` chunks of `EVENT_CHARS` characters of content each (16 KB events), then usage
and ``[DONE]``. Runs in a process of its own so that reading a 4 MB prompt or writing
a fast stream never pauses the test's own event loop (which measures the gateway).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
from aiohttp import web

EVENT_CHARS = 16 * 1024
EVENTS = 4000  # 64 MB per stream: far more than any socket buffer holds
_WORDS = "the of and to in is that it for on with as was at by this from are be or an "


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    head = {"id": "chatcmpl-bulk", "created": 1, "model": body.get("model", "bulk")}
    usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
        return web.json_response(
            {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    text = (_WORDS * (EVENT_CHARS // len(_WORDS) + 1))[:EVENT_CHARS]
    for _ in range(EVENTS):
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    done = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
    await resp.write(b"data: " + orjson.dumps(done) + b"\n\ndata: [DONE]\n\n")
    return resp


async def main(port_file: Path) -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    port_file.write_text(str(port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
