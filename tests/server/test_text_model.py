"""A pretrained transformer served with server-side tokenisation: strings in, sentence embeddings out.

The model is the zoo's minilm_text (all-MiniLM-L6-v2 with onnxruntime-extensions' tokenizer in the graph). A real
server on a free port serves it; the answers are compared with in-process ONNX Runtime on the same file, through
our client, Triton's client and the dynamic batcher, and bad strings get INVALID_ARGUMENT while the server goes on.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from ortserve import zoo
from ortserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError
from ortserve.server import runtime
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server.errors import RepositoryError
from ortserve.server.repository import Repository, discover

MODEL = "minilm_text"
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument on stage.",
    "The stock market fell sharply this morning.",
    "",  # an empty string: [CLS] [SEP] only
    "Café crème, naïve Äpfel and a façade: accents are stripped before WordPiece.",
    "ok",
    "A much longer sentence, with commas, numbers like 3.14 and 2024, and enough words to need far more tokens "
    "than the others in its batch, so they are padded to its length.",
]


@pytest.fixture(scope="module")
def text_repository(tmp_path_factory):
    return zoo.ensure_repository(tmp_path_factory.mktemp("text_repository"), names=(MODEL,))


@pytest.fixture(scope="module")
def text_server(text_repository):
    with BackgroundServer(text_repository, ServerOptions(port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def text_client(text_server):
    with InferenceClient(text_server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local(text_repository):
    """In-process ONNX Runtime on the served file: texts -> embeddings, one run for the whole list."""
    session = runtime.load_session(text_repository / MODEL / "1" / "model.onnx", runtime.SessionSettings())

    def embed(texts) -> np.ndarray:
        return session.run(None, {"text": np.array(list(texts), dtype=object)})[0]

    return embed


def test_metadata_says_bytes_in_and_fp32_embeddings_out(text_client):
    meta = text_client.model_metadata(MODEL)
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [("embedding", "FP32", [-1, zoo.MINILM_DIM])]


def test_strings_of_different_lengths_in_one_request_give_the_in_process_embeddings(text_client, local):
    got = text_client.infer(MODEL, np.array(SENTENCES))["embedding"]
    assert got.shape == (len(SENTENCES), zoo.MINILM_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, local(SENTENCES), atol=1e-6)
    # Each row is what the sentence gets alone (padding to the batch's longest changes nothing but rounding).
    alone = np.concatenate([local([s]) for s in SENTENCES])
    np.testing.assert_allclose(got, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The embeddings mean something: the paraphrase is nearer than the unrelated sentence.
    similarity = got @ got.T
    assert similarity[0, 1] > 0.3 > similarity[0, 2]


def test_an_empty_string_and_an_empty_batch(text_client, local):
    (empty,) = text_client.infer(MODEL, np.array([""], dtype=object))["embedding"]
    np.testing.assert_allclose(empty, local([""])[0], atol=1e-6)
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-5
    nothing = text_client.infer(MODEL, np.array([], dtype=object))["embedding"]
    assert nothing.shape == (0, zoo.MINILM_DIM)


def test_texts_longer_than_the_model_are_truncated_request_after_request(text_client, local):
    long_texts = [f"{i} " + "a rather long sentence that keeps going " * (40 + 15 * i) for i in range(6)]
    for i in range(len(long_texts)):
        texts = [long_texts[i], "short", long_texts[-1 - i]]
        np.testing.assert_allclose(text_client.infer(MODEL, np.array(texts))["embedding"], local(texts), atol=1e-5)
    # Truncated at MINILM_MAX_TOKENS: what follows changes nothing.
    cut = text_client.infer(MODEL, np.array([long_texts[0], long_texts[0] + " and a different ending"]))["embedding"]
    np.testing.assert_allclose(cut[0], cut[1], atol=1e-5)


def test_tritonclient_sends_bytes_and_gets_the_same_embeddings(text_server, local):
    texts = np.array([s.encode("utf-8") for s in SENTENCES], dtype=object)
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts)
    client = triton.InferenceServerClient(text_server.address)
    try:
        got = client.infer(MODEL, [tensor]).as_numpy("embedding")
    finally:
        client.close()
    np.testing.assert_allclose(got, local(SENTENCES), atol=1e-6)


def test_concurrent_requests_are_joined_by_the_batcher_and_each_gets_its_own_rows(text_server, local):
    rng = np.random.default_rng(3)
    requests = [list(rng.choice(SENTENCES, size=int(rng.integers(1, 4)))) for _ in range(24)]

    async def main():
        async with AsyncInferenceClient(text_server.address, timeout=120) as client:
            return await asyncio.gather(*(client.infer(MODEL, np.array(texts)) for texts in requests))

    runner = text_server.server.repository.get(MODEL).runner
    runs_before = runner.runs
    answers = asyncio.run(main())
    for texts, answer in zip(requests, answers):
        np.testing.assert_allclose(answer["embedding"], local(texts), atol=1e-5)
    assert runner.runs - runs_before < len(requests), "no request was joined with another"


def test_bytes_that_are_not_utf8_are_refused_naming_the_element_and_the_server_goes_on(text_client, local):
    with pytest.raises(InferenceServerError) as caught:
        text_client.infer(MODEL, {"text": np.array([b"fine", b"caf\xe9 latin-1"], dtype=object)})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'text'" in caught.value.message and "element 1 is not UTF-8" in caught.value.message
    np.testing.assert_allclose(text_client.infer(MODEL, np.array(["fine"]))["embedding"], local(["fine"]), atol=1e-6)


def test_a_numeric_tensor_for_the_string_input_is_refused(text_client, local):
    with pytest.raises(InferenceServerError) as caught:
        text_client.infer(MODEL, {"text": np.zeros(3, np.float32)})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected strings, got float32" in caught.value.message
    np.testing.assert_allclose(text_client.infer(MODEL, np.array(["ok"]))["embedding"], local(["ok"]), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The custom-op library: loaded for the models that import its domain, and only for them


def test_only_models_importing_the_extensions_domain_load_the_custom_op_library(monkeypatch, text_repository,
                                                                                digits_repository):  # fmt: skip
    text_file = text_repository / MODEL / "1" / "model.onnx"
    assert "ai.onnx.contrib" in runtime.imported_domains(text_file)
    assert runtime.imported_domains(digits_repository / "digits_forest" / "1" / "model.onnx") == {"", "ai.onnx.ml"}

    def unavailable(path, domains):
        raise RepositoryError(f"no custom-op library for {path}")

    monkeypatch.setattr(runtime, "extensions_library", unavailable)
    digits = Repository.load(discover(digits_repository))  # none of them asks for the library
    assert digits.names() == list(zoo.DEFAULT_REPOSITORY_MODELS)
    with pytest.raises(RepositoryError, match="no custom-op library"):
        Repository.load(discover(text_repository))


def test_a_model_needing_onnxruntime_extensions_without_it_installed_says_what_to_install(monkeypatch,
                                                                                          text_repository):  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails as if it were not installed
    with pytest.raises(RepositoryError, match=r"ai\.onnx\.contrib.*pip install onnxruntime-extensions"):
        runtime.load_session(text_repository / MODEL / "1" / "model.onnx", runtime.SessionSettings())


def test_loading_onnxruntime_extensions_leaves_the_environment_of_later_processes_alone():
    probe = "import os; {}; print(os.environ.get('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION'))"
    env = {k: v for k, v in os.environ.items() if k != runtime.PROTOBUF_IMPLEMENTATION}

    def run(statement: str) -> str:
        return subprocess.run([sys.executable, "-c", probe.format(statement)], env=env, capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()  # fmt: skip

    assert run("import onnxruntime_extensions") == "python"  # what the plain import does to os.environ
    assert run("from ortserve.server.runtime import import_extensions; import_extensions()") == "None"


def test_reading_the_domains_of_a_file_that_is_not_a_model_leaves_the_verdict_to_onnx_runtime(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\xff" * 64)
    assert runtime.imported_domains(junk) == set()
    with pytest.raises(RepositoryError, match="ONNX Runtime cannot load"):
        runtime.load_session(junk, runtime.SessionSettings())
