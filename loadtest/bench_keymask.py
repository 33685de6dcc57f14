"""Per-event cost of the stream key masker (`adapters.keymask.StreamMask.feed`) on typical events.

    python -m loadtest.bench_keymask [--rounds 7] [--number 20000]

Prints the best of `rounds` timeit runs per event shape, in microseconds per event, beside
the cost of orjson.loads of the same event (the floor of any masker that reads the text).
"""

from __future__ import annotations

import argparse
import timeit

import orjson

from adapters.keymask import KeyMask

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def _event(choices: list[dict[str, object]]) -> bytes:
    return b"data: " + orjson.dumps(
        {
            "id": "chatcmpl-8a6870df0123456789",
            "object": "chat.completion.chunk",
            "created": 1764950400,
            "model": "llama-3.1-8b-instant",
            "system_fingerprint": "fp_0123456789",
            "choices": choices,
            "usage": None,
        }
    )


def _delta(index: int, **delta: object) -> dict[str, object]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


EVENTS = {
    "n=1 content": _event([_delta(0, content=" the quick")]),
    # Ends in the key's first character: the next event is read against it (the slower path).
    "n=1 content, ...s": _event([_delta(0, content=" the quick brown fox jumps")]),
    "n=2 content": _event([_delta(0, content=" the quick"), _delta(1, content=" brown fox")]),
    "tool call args": _event(
        [_delta(0, tool_calls=[{"index": 0, "function": {"arguments": '{"city": "Par'}}])]
    ),
    "usage (no text)": _event([]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    for name, event in EVENTS.items():
        feed = KeyMask(KEY).stream().feed
        best = min(
            timeit.repeat(lambda e=event, f=feed: f(e), number=args.number, repeat=args.rounds)
        )
        body = event[5:]
        floor = min(
            timeit.repeat(lambda b=body: orjson.loads(b), number=args.number, repeat=args.rounds)
        )
        us, floor_us = best / args.number * 1e6, floor / args.number * 1e6
        print(f"{name:18s} {us:6.2f} us/event  (orjson.loads alone {floor_us:5.2f} us)")


if __name__ == "__main__":
    main()
