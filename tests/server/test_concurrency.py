"""Many concurrent requests of mixed batch sizes: each answer must match its own input."""

from __future__ import annotations

import asyncio

import numpy as np

from ortserve.client import AsyncInferenceClient

N_REQUESTS = 200


def test_200_concurrent_mixed_requests(server, repository, ort_session):
    rng = np.random.default_rng(7)
    cnn = ort_session(repository / "digits_cnn" / "1" / "model.onnx")
    forest = ort_session(repository / "digits_forest" / "1" / "model.onnx")
    jobs = []
    for i in range(N_REQUESTS):
        batch = int(rng.integers(1, 33))
        kind = i % 3
        if kind == 0:
            x = rng.random((batch, 1, 8, 8), dtype=np.float32)
            jobs.append(("digits_cnn", {"input": x}, {"logits": cnn.run(None, {"input": x})[0]}))
        elif kind == 1:
            x = rng.random((batch, 64), dtype=np.float32)
            label, probabilities = forest.run(None, {"input": x})
            jobs.append(("digits_forest", {"input": x}, {"label": label, "probabilities": probabilities}))
        else:
            a, b = rng.random((batch, 4), dtype=np.float32), rng.random((batch, 4), dtype=np.float32)
            jobs.append(("add_sub", {"a": a, "b": b}, {"sum": a + b, "difference": a - b}))

    async def main():
        async with AsyncInferenceClient(server.address, timeout=120) as client:
            return await asyncio.gather(*(client.infer(model, inputs) for model, inputs, _ in jobs))

    answers = asyncio.run(main())
    assert len(answers) == N_REQUESTS
    for (model, _, expected), answer in zip(jobs, answers):
        assert set(answer) == set(expected), model
        for name, want in expected.items():
            np.testing.assert_allclose(answer[name], want, rtol=1e-6, atol=1e-6, err_msg=f"{model}.{name}")
