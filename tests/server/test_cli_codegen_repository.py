"""The command line, the generated code, and reading model repositories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import server_models

from ortserve.client import InferenceClient
from ortserve.server import cli, codegen
from ortserve.server.errors import ModelNotFound, RepositoryError
from ortserve.server.repository import ModelConfig, Repository, discover

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--model_path", "--model_repository", "--address", "--grpc_port", "--http_port", "--log_level",
         "--num_threads", "--inter_op_threads", "--workers", "--lone_request_threads", "--max_batch_size",
         "--max_queue_delay_us",
         "--max_message_mb", "--grace_period", "--tls_cert", "--tls_key", "--tls_client_ca",
         "--auth_token_file", "--metrics_port", "--request_log", "--replicas",
         "--model_control_mode", "--model-control-mode", "--load_model", "--load-model",
         "--repository_poll_secs", "--repository-poll-secs"]  # fmt: skip


def test_help_lists_every_flag():
    help_text = cli.build_parser().format_help()
    for flag in FLAGS:
        assert flag in help_text
    declared = {a for action in cli.build_parser()._actions for a in action.option_strings} - {"-h", "--help"}
    assert declared == set(FLAGS)


def test_run_ort_server_sh_help():
    script = ROOT / "run_ort_server.sh"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True)
    for flag in FLAGS:
        assert flag in result.stdout


def test_ready_line_format():
    line = cli.READY_LINE.format(address="127.0.0.1:50051", models="digits_cnn v1, add_sub v2")
    match = cli.READY_PATTERN.match(line)
    assert match and match["host"] == "127.0.0.1" and match["port"] == "50051"
    assert match["models"] == "digits_cnn v1, add_sub v2"


def test_model_path_subprocess_serves_default(tmp_path):
    model = server_models.save(server_models.plus_constant(1.0), tmp_path / "plus_one.onnx")
    args = ["--grpc_port", "0", "--model_path", str(model), "--log_level", "warning"]
    with cli.ServerProcess(args, python=sys.executable) as server, InferenceClient(server.address) as client:
        assert server.port > 0 and server.models == "default v1"
        np.testing.assert_array_equal(client.infer("default", np.array([1.0], np.float32))["y"], [2.0])
    assert server.process.returncode == 0


def test_missing_model_path_exits_1(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ortserve", "serve", "--grpc_port", "0", "--model_path", str(tmp_path / "none.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "no such file" in result.stderr


def test_generated_code_is_up_to_date(tmp_path):
    """`make protos` output must match what is committed in src/ortserve/_proto/."""
    fresh = {p.name: p.read_text() for p in codegen.generate(tmp_path)}
    committed_dir = ROOT / "src" / "ortserve" / "_proto"
    committed = {p.name: p.read_text() for p in committed_dir.iterdir() if "_pb2" in p.name}
    assert sorted(fresh) == sorted(committed)
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} drifted from protos/: run `make protos`"


def test_protos_are_importable_beside_tritonclient():
    """Our v2 messages live in their own descriptor pool, so tritonclient's identical names do not clash.

    (This test process imported ours first; here tritonclient goes first.)"""
    code = "import tritonclient.grpc, ortserve.client, ortserve.server.app"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# Repositories


def test_directory_with_config_and_versions(repository):
    sources = discover(repository)
    versioned = [s for s in sources if s.name == "versioned"]
    assert [s.version for s in versioned] == [1, 2, 3]
    (add_sub,) = [s for s in sources if s.name == "add_sub"]
    assert add_sub.config == ModelConfig(max_batch_size=8, intra_op_threads=1)


def test_model_config_list(tmp_path, repository):
    listing = {
        "model_config_list": [
            {"name": "first", "base_path": str(repository / "versioned"), "model_platform": "onnx",
             "max_batch_size": 4},  # fmt: skip
            {"name": "second", "base_path": "relative.onnx", "model_platform": "onnxruntime_onnx"},
            {"name": "third", "base_path": str(repository / "add_sub" / "1")},
        ]
    }
    server_models.save(server_models.plus_constant(5.0), tmp_path / "relative.onnx")
    (tmp_path / "list.json").write_text(json.dumps(listing))
    sources = discover(tmp_path / "list.json")
    found = [(s.name, s.version) for s in sources]
    assert found == [("first", 1), ("first", 2), ("first", 3), ("second", 1), ("third", 1)]
    assert sources[0].config.max_batch_size == 4
    repo = Repository.load(sources)
    assert repo.get("first").version == 3 and repo.get("first", "2").version == 2
    with pytest.raises(ModelNotFound, match="has no version '7'; it has 1, 2, 3"):
        repo.get("first", "7")


@pytest.mark.parametrize(
    "content, words",
    [
        ({"model_config_list": [{"name": "m", "base_path": "nowhere"}]}, "does not exist"),
        ({"model_config_list": [{"name": "m", "base_path": "x.onnx", "model_platform": "tensorflow"}]}, "tensorflow"),
        ({"model_config_list": []}, "model_config_list"),
        ({"models": []}, "model_config_list"),
    ],
)
def test_bad_config_list(tmp_path, content, words):
    (tmp_path / "list.json").write_text(json.dumps(content))
    with pytest.raises(RepositoryError, match=words):
        discover(tmp_path / "list.json")


def test_bad_repositories(tmp_path):
    with pytest.raises(RepositoryError, match="holds no models"):
        discover(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(RepositoryError, match="has no version"):
        discover(tmp_path)
    server_models.save(server_models.plus_constant(1.0), tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "config.json").write_text('{"max_batch_size": -1}')
    with pytest.raises(RepositoryError, match="max_batch_size"):
        discover(tmp_path)
    (tmp_path / "m" / "config.json").write_text('{"max_batch_sise": 4}')
    with pytest.raises(RepositoryError, match="max_batch_sise"):
        discover(tmp_path)
    (tmp_path / "m" / "config.json").unlink()
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RepositoryError, match="cannot load"):
        Repository.load(discover(tmp_path))
