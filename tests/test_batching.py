"""Micro-batching of concurrent decoder calls."""

from __future__ import annotations

import threading

import torch

from models.registry import build, get_preset
from server.batching import MicroBatcher


def test_concurrent_calls_are_merged_and_each_caller_gets_its_rows() -> None:
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, cfg).eval()
    calls: list[int] = []

    def decode(enc, cond):  # type: ignore[no-untyped-def]
        calls.append(len(cond))
        with torch.no_grad():
            return gen.decode(enc, cond)

    batcher = MicroBatcher(decode, max_batch=8, max_wait_ms=200)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    cond = torch.randint(-1, 2, (6, cfg.n_attrs)).float()
    with torch.no_grad():
        enc = gen.encode(x)
        expected, _ = gen.decode(enc, cond)
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(6)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = batcher(enc.select(i), cond[i : i + 1])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) < 6, "no call was merged"
    assert sum(calls) == 6
    for i in range(6):
        torch.testing.assert_close(results[i][0], expected[i], atol=1e-5, rtol=1e-4)  # BN in eval: row-independent
    batcher.close()
    # after close, calls still work (directly)
    out, _ = batcher(enc.select(0), cond[:1])
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-4)


def test_an_error_reaches_every_caller() -> None:
    def broken(enc, cond):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    batcher = MicroBatcher(broken, max_batch=4, max_wait_ms=1)
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, cfg).eval()
    with torch.no_grad():
        enc = gen.encode(torch.zeros(1, 3, 32, 32))
    try:
        batcher(enc, torch.zeros(1, cfg.n_attrs))
    except RuntimeError as exc:
        assert "boom" in str(exc)
    else:
        raise AssertionError("the error was swallowed")
