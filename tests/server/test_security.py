"""TLS, mutual TLS and bearer tokens (ortserve.server.security), against real servers with a throw-away PKI.

The main server here is `python -m ortserve serve` in a subprocess with mutual TLS, a token file of two tokens
and the verbose log captured; smaller cases run the same server in-process (BackgroundServer).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import numpy_helper
from server_models import digits_inputs

from ortserve._proto import grpc_service_pb2 as pb
from ortserve._proto import grpc_service_pb2_grpc as pb_grpc
from ortserve._proto import predict_pb2, predict_pb2_grpc
from ortserve.client import AsyncInferenceClient, ClientTls, InferenceClient, InferenceServerError
from ortserve.server.app import BackgroundServer, ServerOptions
from ortserve.server import cli
from ortserve.server.cli import ServerProcess
from ortserve.server.errors import ConfigurationError, Unauthenticated
from ortserve.server.security import (
    TOKEN_ENV,
    TokenAuthority,
    is_health_check,
    is_health_route,
    make_throwaway_pki,
    new_token,
)

TOKEN, ROTATED_IN = new_token(), new_token()  # the token file holds both
WRONG = new_token()
MODEL = "default"  # --model_path serves its file under this name; the legacy protocol serves it too


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_throwaway_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory):
    """Another CA with its own client certificate: trusted by nobody here."""
    return make_throwaway_pki(tmp_path_factory.mktemp("foreign_pki"))


@pytest.fixture(scope="module")
def model_file(digits_repository):
    return digits_repository / "digits_cnn" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# the current token\n{TOKEN}\n\n# the next one, during the rotation\n{ROTATED_IN}\n")
    return path


@pytest.fixture(scope="module")
def secured(pki, model_file, token_file):
    """The CLI server with mutual TLS and two tokens, its verbose log captured."""
    args = ["--grpc_port", "0", "--model_path", str(model_file), "--log_level", "verbose",
            "--auth_token_file", str(token_file), *pki.server_flags(mutual=True)]  # fmt: skip
    server = ServerProcess(args, python=sys.executable, capture_log=True).start()
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def client_tls(pki):
    return ClientTls(ca=pki.ca_cert, cert=pki.client_cert, key=pki.client_key)


def channel_to(server, pki, cert: bool = True) -> grpc.Channel:
    key, chain = (pki.client_key.read_bytes(), pki.client_cert.read_bytes()) if cert else (None, None)
    return grpc.secure_channel(server.address, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), key, chain))


def rest_client(server, pki, cert: bool = True) -> httpx.Client:
    """An HTTPS client of the server's REST endpoint that trusts the throw-away CA (and shows its certificate)."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return httpx.Client(base_url=f"https://{server.endpoints['REST']}", verify=context, timeout=30)


REST_INFER_BODY = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
REST_GUARDED = [("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/versions/1"),
                ("POST", f"/v2/models/{MODEL}/infer"), ("GET", "/v2/no_such_route")]  # fmt: skip
REST_HEALTH = ["/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
               f"/v2/models/{MODEL}/versions/1/ready"]


def rest_call(client: httpx.Client, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.request(method, path, json=REST_INFER_BODY if method == "POST" else None, headers=headers)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# Every kind of call that needs a token: v2 unary, legacy Predict, reflection (a bidirectional stream).
def call_infer(channel, metadata):
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=30)


def call_model_metadata(channel, metadata):
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=MODEL),
                                                                   metadata=metadata, timeout=30)  # fmt: skip


def call_server_metadata(channel, metadata):
    return pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata,
                                                                    timeout=30)  # fmt: skip


def call_legacy_predict(channel, metadata):
    request = predict_pb2.PredictRequest()
    request.inputs["input"].CopyFrom(numpy_helper.from_array(np.zeros((1, 1, 8, 8), np.float32), "input"))
    return predict_pb2_grpc.PredictionServiceStub(channel).Predict(request, metadata=metadata, timeout=30)


def call_reflection(channel, metadata):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    return next(iter(stub.ServerReflectionInfo(requests, metadata=metadata, timeout=30)))


GUARDED_CALLS = [call_infer, call_model_metadata, call_server_metadata, call_legacy_predict, call_reflection]
BAD_AUTHORIZATION = {
    "missing": (None, "requires a bearer token"),
    "wrong token": (bearer(WRONG), "not one this server accepts"),
    "no scheme": ([("authorization", TOKEN)], "not of the form 'Bearer <token>'"),
    "basic scheme": ([("authorization", f"Basic {TOKEN}")], "not of the form 'Bearer <token>'"),
    "empty bearer": ([("authorization", "Bearer ")], "not of the form 'Bearer <token>'"),
    "two values": (bearer(TOKEN) + bearer(WRONG), "expected one"),
}


# --------------------------------------------------------------------------------------------------
# The secured CLI server


def test_ready_line_says_how_it_is_secured(secured):
    assert secured.security == "mutual TLS, bearer tokens"
    assert secured.models == "default v1"


def test_our_client_with_certificate_and_token(secured, client_tls, model_file, ort_session):
    images = digits_inputs("digits_cnn")
    expected = ort_session(model_file).run(None, {"input": images})[0]
    with InferenceClient(secured.address, token=TOKEN, tls=client_tls) as client:
        assert client.server_ready()
        np.testing.assert_allclose(client.infer(MODEL, images)["logits"], expected, rtol=1e-5, atol=1e-5)
        assert client.server_metadata().name == "ortserve"


def test_async_client_with_certificate_and_token(secured, client_tls):
    import asyncio

    async def go() -> tuple[bool, tuple[int, ...]]:
        async with AsyncInferenceClient(secured.address, token=ROTATED_IN, tls=client_tls) as client:
            return await client.server_ready(), (await client.infer(MODEL, digits_inputs("digits_cnn", 3)))[
                "logits"].shape  # fmt: skip

    assert asyncio.run(go()) == (True, (3, 10))


@pytest.mark.parametrize("token", [TOKEN, ROTATED_IN], ids=["current", "rotated_in"])
@pytest.mark.parametrize("call", GUARDED_CALLS, ids=lambda c: c.__name__)
def test_every_listed_token_opens_every_call(secured, pki, call, token):
    with channel_to(secured, pki) as channel:
        assert call(channel, bearer(token)) is not None


@pytest.mark.parametrize("bad", list(BAD_AUTHORIZATION))
@pytest.mark.parametrize("call", GUARDED_CALLS, ids=lambda c: c.__name__)
def test_bad_authorization_is_unauthenticated(secured, pki, call, bad):
    metadata, words = BAD_AUTHORIZATION[bad]
    with channel_to(secured, pki) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = caught.value.details()
    assert words in details
    if bad != "wrong token":
        assert "'authorization: Bearer <token>'" in details
    for secret in (TOKEN, ROTATED_IN, WRONG):
        assert secret not in details


def test_health_checks_need_no_token(secured, pki):
    with channel_to(secured, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", MODEL, "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=30).ready
    with InferenceClient(secured.address, tls=ClientTls(pki.ca_cert, pki.client_cert, pki.client_key)) as tokenless:
        assert tokenless.health() == "SERVING" and tokenless.server_live()
        with pytest.raises(InferenceServerError) as caught:
            tokenless.model_metadata(MODEL)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_client_cannot_connect(secured):
    with InferenceClient(secured.address, token=TOKEN, timeout=10) as plaintext:
        with pytest.raises(InferenceServerError) as caught:
            plaintext.server_live()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(secured, pki, foreign_pki):
    no_certificate = ClientTls(ca=pki.ca_cert)
    foreign_certificate = ClientTls(ca=pki.ca_cert, cert=foreign_pki.client_cert, key=foreign_pki.client_key)
    for tls in (no_certificate, foreign_certificate):
        with InferenceClient(secured.address, token=TOKEN, tls=tls, timeout=10) as client:
            with pytest.raises(InferenceServerError) as caught:
                client.server_live()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_its_ca_did_not_sign(secured, pki, foreign_pki):
    impostor_check = ClientTls(ca=foreign_pki.ca_cert, cert=pki.client_cert, key=pki.client_key)
    with InferenceClient(secured.address, token=TOKEN, tls=impostor_check, timeout=10) as client:
        with pytest.raises(InferenceServerError) as caught:
            client.server_live()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_tritonclient_with_its_own_tls_and_header_options(secured, pki):
    client = triton.InferenceServerClient(secured.address, ssl=True, root_certificates=str(pki.ca_cert),
                                          private_key=str(pki.client_key),
                                          certificate_chain=str(pki.client_cert))  # fmt: skip
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_live() and client.is_model_ready(MODEL)  # health: no header needed
        tensor = triton.InferInput("input", [2, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(digits_inputs("digits_cnn", 2))
        assert client.infer(MODEL, [tensor], headers=headers).as_numpy("logits").shape == (2, 10)
        with pytest.raises(triton.InferenceServerException) as caught:
            client.infer(MODEL, [tensor])
        assert "UNAUTHENTICATED" in caught.value.status() and "bearer token" in caught.value.message()
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------
# The same over REST (HTTPS on the REST port, same certificate, same tokens)


def test_rest_health_routes_need_no_token(secured, pki):
    with rest_client(secured, pki) as client:
        for path in REST_HEALTH:
            answer = client.get(path)
            assert answer.status_code == 200 and answer.json().get("live", answer.json().get("ready")) is True


@pytest.mark.parametrize("method,path", REST_GUARDED)
def test_rest_without_a_good_token_is_401(secured, pki, method, path):
    with rest_client(secured, pki) as client:
        for headers, words in [(None, "requires a bearer token"), ({"Authorization": f"Bearer {WRONG}"}, "not one"),
                               ({"Authorization": TOKEN}, "not of the form"),
                               ({"Authorization": f"Basic {TOKEN}"}, "not of the form")]:  # fmt: skip
            answer = rest_call(client, method, path, headers)
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert words in answer.json()["error"]
            assert all(secret not in answer.text for secret in (TOKEN, WRONG))


@pytest.mark.parametrize("token", [TOKEN, ROTATED_IN], ids=["current", "rotated_in"])
def test_rest_with_a_good_token(secured, pki, token):
    with rest_client(secured, pki) as client:
        headers = {"Authorization": f"Bearer {token}"}
        assert rest_call(client, "GET", "/v2", headers).json()["name"] == "ortserve"
        answer = rest_call(client, "POST", f"/v2/models/{MODEL}/infer", headers)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 10]
        assert rest_call(client, "GET", "/v2/no_such_route", headers).status_code == 404  # past the check: routing


def test_rest_refuses_plaintext_and_clients_without_a_certificate(secured, pki):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{secured.endpoints['REST']}/v2/health/live", timeout=10)
    with rest_client(secured, pki, cert=False) as certless, pytest.raises(httpx.TransportError):
        certless.get("/v2/health/live")


def test_tokens_never_reach_the_log(pki, model_file, token_file):
    """Good and bad calls (gRPC and REST) against a verbose server, then every line it logged: no token in any."""
    args = ["--grpc_port", "0", "--model_path", str(model_file), "--log_level", "verbose",
            "--auth_token_file", str(token_file), *pki.server_flags()]  # fmt: skip
    server = ServerProcess(args, python=sys.executable, capture_log=True).start()
    try:
        with channel_to(server, pki, cert=False) as channel:
            call_infer(channel, bearer(TOKEN))
            for metadata, _ in BAD_AUTHORIZATION.values():
                with pytest.raises(grpc.RpcError):
                    call_infer(channel, metadata)
        with rest_client(server, pki, cert=False) as client:
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert rest_call(client, "POST", f"/v2/models/{MODEL}/infer", good).is_success
            for headers in ({"Authorization": f"Bearer {WRONG}"}, {"Authorization": TOKEN}):
                assert rest_call(client, "POST", f"/v2/models/{MODEL}/infer", headers).status_code == 401
    finally:
        assert server.terminate() == 0
    lines = []
    while (line := server.log_lines.get(timeout=30)) is not None:
        lines.append(line)
    log = "".join(lines)
    assert "DEBUG" in log and "admitted call" in log  # the verbose log was on and saw the good call
    assert log.count("refused /inference.GRPCInferenceService/ModelInfer") == len(BAD_AUTHORIZATION)
    assert log.count(f"refused POST /v2/models/{MODEL}/infer") == 2
    assert "with TLS, bearer tokens" in log
    for secret in (TOKEN, ROTATED_IN, WRONG):
        assert secret not in log


def test_token_from_environment_without_tls(model_file, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, f"{WRONG},{TOKEN}")  # two tokens, comma-separated
    args = ["--grpc_port", "0", "--model_path", str(model_file), "--log_level", "warning"]
    with ServerProcess(args, python=sys.executable) as server:
        assert server.security == "bearer tokens"
        for token in (TOKEN, WRONG):
            with InferenceClient(server.address, token=token) as client:
                assert client.model_metadata(MODEL).name == MODEL
        with InferenceClient(server.address) as client, pytest.raises(InferenceServerError) as caught:
            client.model_metadata(MODEL)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------------------------------------
# Rotation without a restart (in-process server, the token file rewritten under it)


def test_token_file_is_reread_when_it_changes(tmp_path, model_file):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    # The file is looked at on every call here, so each change shows at the next call, with no waiting.
    options = ServerOptions(port=0, auth=TokenAuthority.from_file(tokens, reload_interval=0))
    with BackgroundServer(model_file, options) as server:

        def accepted(token: str) -> bool:
            with InferenceClient(server.address, token=token) as client:
                try:
                    return client.server_metadata().name == "ortserve"
                except InferenceServerError as error:
                    assert error.code == grpc.StatusCode.UNAUTHENTICATED
                    return False

        assert accepted(TOKEN) and not accepted(ROTATED_IN)
        replacement = tmp_path / "tokens.new"
        replacement.write_text(f"{TOKEN}\n{ROTATED_IN}\n")
        os.replace(replacement, tokens)  # atomically, as a secret store would
        assert accepted(ROTATED_IN) and accepted(TOKEN)
        tokens.write_text(f"# {TOKEN} retired\n{ROTATED_IN}\n")
        assert not accepted(TOKEN) and accepted(ROTATED_IN)
        tokens.write_text("")  # a broken update keeps the tokens in force
        assert accepted(ROTATED_IN) and not accepted(TOKEN)


def test_token_file_is_looked_at_only_once_per_reload_interval(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    authority = TokenAuthority.from_file(tokens, reload_interval=3600)
    tokens.write_text(f"{ROTATED_IN}\n")
    assert authority.accepts(TOKEN) and not authority.accepts(ROTATED_IN)  # the change waits for the next look


# --------------------------------------------------------------------------------------------------
# Start-up errors: the server refuses to start, saying what is wrong


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ortserve", "serve", "--grpc_port", "0", *args]
    environment = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


def test_startup_errors_exit_1_with_a_clear_message(tmp_path, pki, foreign_pki, model_file):
    mismatched = serve("--model_path", str(model_file), "--tls_cert", str(pki.server_cert), "--tls_key",
                       str(foreign_pki.server_key))  # fmt: skip
    assert mismatched.returncode == 1 and "serving on" not in mismatched.stdout
    assert f"private key {foreign_pki.server_key} does not belong to certificate {pki.server_cert}" in mismatched.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    both = serve("--model_path", str(model_file), "--auth_token_file", str(empty), env={TOKEN_ENV: TOKEN})
    assert both.returncode == 1 and "both --auth_token_file and $ORTSERVE_AUTH_TOKEN" in both.stderr
    assert TOKEN not in both.stderr


def test_bad_security_settings_are_refused_before_anything_starts(tmp_path, pki, foreign_pki, monkeypatch):
    """What the CLI checks before it loads a model (ConfigurationError ends `serve` with status 1, as above)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    spaced = tmp_path / "spaced.txt"
    spaced.write_text(f"{TOKEN}\ntwo words\n")
    not_pem = tmp_path / "not_pem.key"
    not_pem.write_text("hello\n")
    cases = [
        (["--tls_cert", str(tmp_path / "none.crt"), "--tls_key", str(pki.server_key)],
         "certificate (--tls_cert) " + str(tmp_path / "none.crt") + ": cannot read it (No such file or directory)"),
        (["--tls_cert", str(pki.server_cert), "--tls_key", str(foreign_pki.server_key)],
         "does not belong to certificate"),
        (["--tls_cert", str(pki.server_cert), "--tls_key", str(not_pem)], "not a PEM private key"),
        (["--tls_cert", str(pki.server_key), "--tls_key", str(pki.server_key)], "no PEM certificate"),
        (["--tls_cert", str(pki.server_cert)], "needs both --tls_cert and --tls_key"),
        (["--tls_client_ca", str(pki.ca_cert)], "--tls_client_ca needs TLS"),
        (pki.server_flags() + ["--tls_client_ca", str(tmp_path / "none_ca.crt")], "none_ca.crt: cannot read it"),
        (["--auth_token_file", str(empty)], "no token in it (expected one token per line"),
        (["--auth_token_file", str(tmp_path / "none.txt")], "none.txt: cannot read it"),
        (["--auth_token_file", str(spaced)], "line 2: has characters a bearer token cannot carry"),
    ]  # fmt: skip
    for flags, words in cases:
        with pytest.raises(ConfigurationError) as caught:
            cli.options_from(cli.build_parser().parse_args(flags))
        assert words in str(caught.value), flags
        assert TOKEN not in str(caught.value)
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ConfigurationError, match=r"\$ORTSERVE_AUTH_TOKEN: no token in it \(expected one token, or "):
        cli.options_from(cli.build_parser().parse_args([]))


# --------------------------------------------------------------------------------------------------
# The pieces on their own


def test_token_authority_checks_and_keeps_its_secrets(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"  {TOKEN}  \n#{WRONG}\n{ROTATED_IN}\n")
    authority = TokenAuthority.from_file(path)
    assert authority.count == 2 and authority.accepts(TOKEN) and authority.accepts(ROTATED_IN)
    assert not authority.accepts(WRONG) and not authority.accepts(TOKEN[:-1]) and not authority.accepts("")
    assert TOKEN not in repr(authority) and "2 token(s)" in repr(authority)
    authority.check([f"bearer {TOKEN}"])  # the scheme is case-insensitive (RFC 7235)
    for values in ([], [TOKEN], [f"Token {TOKEN}"], [f"Bearer {WRONG}"], [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]):
        with pytest.raises(Unauthenticated) as caught:
            authority.check(values)
        assert TOKEN not in caught.value.message and WRONG not in caught.value.message
    with pytest.raises(ConfigurationError, match="no token given"):
        TokenAuthority([], "nothing")


def test_which_calls_are_health_checks():
    for path in REST_HEALTH:
        assert is_health_route(path)
    for path in ("/v2", "/v2/models/ready", "/v2/models/m/infer", "/v2/models/m/versions/1", "/v2/health/other",
                 "/v2/models/m/ready/x", "/x/v2/health/live", "/v2/health/live/"):  # fmt: skip
        assert not is_health_route(path)
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                   "/inference.GRPCInferenceService/ModelReady"):  # fmt: skip
        assert is_health_check(method)
    for method in ("/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ServerMetadata",
                   "/onnxruntime.server.PredictionService/Predict",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                   "/grpc.health.v1.HealthX/Check", "/evil.grpc.health.v1.Health/Check"):  # fmt: skip
        assert not is_health_check(method)


def test_tls_settings_never_show_the_key(pki):
    settings = pki.server_tls(mutual=True)
    assert settings.mutual and settings.describe() == "mutual TLS"
    assert "PRIVATE KEY" not in repr(settings) and "server.key" in repr(settings)
    kwargs = settings.uvicorn_kwargs()
    assert kwargs["ssl_keyfile"] == str(pki.server_key) and kwargs["ssl_ca_certs"] == str(pki.ca_cert)
