"""The container image and the Kubernetes manifests, checked without Docker or a cluster.

- deploy/*.yaml against Kubernetes' own schemas (kubernetes-validate, strict: an unknown field fails), at the
  oldest version the manifests need and at the newest the validator ships;
- the Dockerfiles through hadolint at its default threshold;
- every command line the image and the manifests run parses with the real parsers, and the ports agree: CMD,
  EXPOSE, HEALTHCHECK, container ports, probes, Service target ports, KServe's runtime;
- requirements-server.txt: pinned as requirements.txt, closed under dependencies, no torch or Jupyter; and the
  server, its health command and `serve` itself run with nothing else importable (tests/slim_image);
- the build context that .dockerignore lets through holds what the Dockerfile copies, and the package builds
  from it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

from ortserve import health, zoo
from ortserve.client import InferenceClient
from ortserve.server import cli
from ortserve.server.app import BackgroundServer, ServerOptions

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [ROOT / "Dockerfile", DEPLOY / "models.Dockerfile"]
# Oldest: the preStop `sleep` action is on by default from 1.30 (gRPC probes from 1.27). Newest: the validator's.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# Never in the image: the training stack, notebooks, the big model libraries.
FORBIDDEN = ["torch", "torchvision", "transformers", "sentence-transformers", "scikit-learn", "xgboost",
             "jupyterlab", "jupyter-core", "ipykernel", "ipython", "notebook-shim", "matplotlib", "pandas",
             "tritonclient"]  # fmt: skip
FORBIDDEN_MODULES = ["torch", "torchvision", "transformers", "sklearn", "xgboost", "jupyter_core", "jupyterlab",
                     "IPython", "ipykernel", "matplotlib", "pandas", "tritonclient", "ortserve.zoo",
                     "ortserve.data"]  # fmt: skip


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
            out[normalise(requirement.name)] = spec.version
    return out


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes manifest in deploy/ (not KServe's, not kustomization.yaml)."""
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str | None = None, docs: list[tuple[str, dict]] | None = None) -> dict:
    found = [d for _, d in (docs or manifests()) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            joined.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def exec_form(arguments: str) -> list[str]:
    """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD (exec form: no shell between Docker and Python)."""
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), arguments
    return words


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def serve_args(command: list[str]) -> list[str]:
    """The flags of a `python -m ortserve serve ...` command (after the image's entrypoint)."""
    assert command[0] == "serve", f"expected the serve command, got {command}"
    return command[1:]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --------------------------------------------------------------------------------------------------
# Kubernetes manifests


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for _, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError, naming the field


def test_validation_is_strict():
    """The check above can fail: an unknown field (a typo) is refused, so is a wrong type."""
    deployment = copy.deepcopy(find("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    hpa = copy.deepcopy(find("HorizontalPodAutoscaler"))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="two"):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    images = {i["name"] for i in kustomization["images"]}
    spec = find("Deployment")["spec"]["template"]["spec"]
    used = {c["image"].split(":")[0] for c in spec["containers"] + spec["initContainers"]}
    assert used == images


def test_deployment_runs_the_real_command_line_and_its_ports_agree():
    deployment = find("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container["args"])
    parsed = cli.build_parser().parse_args(args)  # exits (SystemExit) on a flag the server does not have
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": parsed.grpc_port, "http": parsed.http_port, "metrics": parsed.metrics_port}
    assert parsed.address == "0.0.0.0" and parsed.replicas == 1  # reachable from outside the pod; scale with pods
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == parsed.grpc_port, probe
        assert container[probe]["grpc"].get("service", "") == ""  # grpc.health.v1 of the whole server
    # Restart only a server that stays unhealthy longer than it takes to drain.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > parsed.grace_period
    # SIGKILL comes after terminationGracePeriodSeconds: it must cover the preStop sleep and the drain.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + parsed.grace_period
    # The models the init container copies are where the server reads them.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (init,) = pod["initContainers"]
    (init_mount,) = init["volumeMounts"]
    assert mounts[init_mount["name"]] == str(parsed.model_repository)
    assert init["command"][-1].rstrip("/") == init_mount["mountPath"]
    # One worker per requested CPU: in a pod os.cpu_count() is the node's cores, not the pod's.
    requests = container["resources"]["requests"]
    assert parsed.workers == int(requests["cpu"]) and "memory" in container["resources"]["limits"]


def test_deployment_runs_as_the_images_non_root_user():
    pod = find("Deployment")["spec"]["template"]["spec"]
    user = dict(final_stage(dockerfile()))["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runAsNonRoot needs a numeric, non-root USER in the image"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user)
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_services_reach_the_container_ports():
    deployment = find("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = [d for _, d in manifests() if d["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (by_name[target] if isinstance(target, str) else target) in by_name.values()
    main = find("Service", "ortserve")
    assert {p["name"]: by_name[p["targetPort"]] for p in main["spec"]["ports"]} == by_name
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == by_name  # same numbers outside as inside
    assert find("Service", "ortserve-headless")["spec"]["clusterIP"] == "None"


def test_autoscaler_scales_the_deployment_on_cpu():
    deployment, hpa = find("Deployment"), find("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                     deployment["metadata"]["name"])  # fmt: skip
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]  # utilisation is measured against the request
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always evict one pod


def test_kserve_runtime_runs_the_real_command_line():
    """KServe's kinds are not in kubernetes-validate (CRDs): their flags and ports are checked here."""
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    parsed = cli.build_parser().parse_args(serve_args(container["args"]))
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert str(parsed.model_repository) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == parsed.grpc_port
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


# --------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path):
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_find_problems(tmp_path):
    """The check above can fail: an unpinned, cached pip install and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install numpy\n")
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "DL3013" in result.stdout and "DL3042" in result.stdout


def test_dockerfile_commands_parse_and_ports_agree():
    instructions = final_stage(dockerfile())
    found = dict(instructions)
    assert exec_form(found["ENTRYPOINT"]) == ["python", "-m", "ortserve"]
    args = serve_args(exec_form(found["CMD"]))
    parsed = cli.build_parser().parse_args(args)
    assert str(parsed.model_repository) == "/models" and parsed.address == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for p in found["EXPOSE"].split()}
    assert exposed == {parsed.grpc_port, parsed.http_port, parsed.metrics_port} == {50051, 9001, 8002}
    options, _, check = found["HEALTHCHECK"].partition("CMD ")
    health_command = exec_form(check)
    assert health_command[:4] == ["python", "-m", "ortserve", "health"]
    checked = health.build_parser().parse_args(health_command[4:])
    assert checked.address == f"127.0.0.1:{parsed.grpc_port}"
    seconds = {k.lstrip("-"): v for k, v in (o.split("=") for o in shlex.split(options))}
    assert checked.timeout < float(seconds["timeout"].rstrip("s"))  # the command gives up before Docker kills it
    assert found["STOPSIGNAL"] == "SIGTERM"


def test_dockerfile_installs_the_slim_requirements_without_torch():
    text = (ROOT / "Dockerfile").read_text()
    froms = [args for name, args in dockerfile() if name == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    assert "pip install --no-cache-dir -r /tmp/requirements-server.txt" in text
    assert "pip install --no-cache-dir --no-deps /tmp/ortserve" in text
    assert "requirements.txt" not in text.replace("requirements-server.txt", "")


# --------------------------------------------------------------------------------------------------
# The image's dependencies


def test_server_requirements_are_pinned_as_the_course_and_exclude_torch():
    course, server = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-server.txt")
    assert server, "requirements-server.txt is empty"
    different = {name: (version, course.get(name)) for name, version in server.items() if course.get(name) != version}
    assert not different, f"pins differ from requirements.txt (server, course): {different}"
    assert not set(server) & {normalise(n) for n in FORBIDDEN}
    assert {"onnxruntime", "grpcio", "grpcio-health-checking", "protobuf", "numpy"} <= set(server)


def test_server_requirements_hold_every_dependency():
    """Each listed package's own requirements (as installed in .venv, markers evaluated) are listed too."""
    server = pins(ROOT / "requirements-server.txt")
    environment = default_environment()
    missing = {}
    for name in server:
        for text in distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
                if normalise(requirement.name) not in server:
                    missing.setdefault(name, []).append(requirement.name)
    assert not missing, f"requirements-server.txt lacks dependencies: {missing}"


def slim_environment(monkeypatch) -> None:
    """Subprocesses started from now on see only the image's packages (tests/slim_image/sitecustomize.py)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "slim_image"))
    monkeypatch.setenv("ORTSERVE_SLIM_REQUIREMENTS", str(ROOT / "requirements-server.txt"))


def forbidden_attempts(stderr_lines) -> list[str]:
    """The forbidden modules a slim process tried to import (optional imports too: the blocker reports each)."""
    names = [m[1] for line in stderr_lines if (m := re.search(r"slim-image: blocked import (\S+)", line))]
    return [name for name in names if name in FORBIDDEN_MODULES or name.partition(".")[0] in FORBIDDEN_MODULES]


def test_server_modules_import_in_the_slim_image(monkeypatch):
    slim_environment(monkeypatch)
    # codegen.py is `make protos` (grpcio-tools), a tool for the checkout, not for the image.
    modules = [f"ortserve.server.{p.stem}" for p in (ROOT / "src/ortserve/server").glob("*.py")
               if p.stem not in ("__init__", "codegen")] + ["ortserve.client", "ortserve.health", "ortserve.__main__"]
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert not [m for m in loaded if m in FORBIDDEN_MODULES or m.partition(".")[0] in FORBIDDEN_MODULES]
    assert set(modules) <= set(loaded)
    assert not forbidden_attempts(result.stderr.splitlines()), result.stderr
    # The blocker works: torch is installed here, and is refused.
    refused = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "slim-image: blocked import torch" in refused.stderr


@pytest.fixture(scope="module")
def onnx_repository(tmp_path_factory) -> Path:
    """A repository of plain .onnx files (built here, by a process that may use torch)."""
    source = zoo.ensure_repository()
    root = tmp_path_factory.mktemp("onnx_repository")
    for name in ("digits_cnn", "digits_forest"):
        (root / name / "1").mkdir(parents=True)
        shutil.copyfile(source / name / "1" / "model.onnx", root / name / "1" / "model.onnx")
    return root


def test_serve_and_health_run_in_the_slim_image(monkeypatch, onnx_repository):
    slim_environment(monkeypatch)
    server = cli.ServerProcess(["--grpc_port", "0", "--model_repository", str(onnx_repository)], capture_log=True)
    with server:
        with InferenceClient(server.address) as client:
            logits = client.infer("digits_cnn", np.zeros((2, 1, 8, 8), np.float32))["logits"]
            assert logits.shape == (2, 10)
            forest = client.infer("digits_forest", np.zeros((1, 64), np.float32))  # a tree ensemble (ai.onnx.ml)
            assert forest["probabilities"].shape == (1, 10)
        with urllib.request.urlopen(f"http://{server.endpoints['REST']}/v2/health/ready", timeout=30) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"http://{server.endpoints['metrics']}/metrics", timeout=30) as answer:
            assert b"ortserve_requests" in answer.read()
        checked = subprocess.run([sys.executable, "-m", "ortserve", "health", "--address", server.address],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert checked.returncode == 0 and checked.stdout.strip() == f"{server.address}: SERVING"
        assert not forbidden_attempts(checked.stderr.splitlines()), checked.stderr
    assert server.process.returncode == 0
    log_lines = []
    while (line := server.log_lines.get(timeout=30)) is not None:
        log_lines.append(line)
    assert not forbidden_attempts(log_lines), "".join(log_lines)


def test_health_command_exits_0_only_when_serving(onnx_repository, capsys):
    """The image's HEALTHCHECK: one line out, exit 0 for SERVING, 1 for anything else."""

    def run(*args: str) -> tuple[int, str]:
        status = health.main(list(args))
        out = capsys.readouterr().out
        assert out.count("\n") == 1, out
        return status, out.strip()

    with BackgroundServer(onnx_repository, ServerOptions(port=0)) as server:
        address = server.address
        assert run("--address", address) == (0, f"{address}: SERVING")
        assert run("--address", address, "--service", "digits_cnn") == (0, f"{address} digits_cnn: SERVING")
        status, line = run("--address", address, "--service", "no_such_model")
        assert status == 1 and line.startswith(f"{address} no_such_model: NOT_FOUND")
    status, line = run("--address", address, "--timeout", "5")  # nothing listens there any more
    assert status == 1 and line.startswith(f"{address}: UNAVAILABLE")
    status, line = run("--address", address, "--tls_ca", str(onnx_repository / "no_such_ca.pem"))
    assert status == 1 and "no_such_ca.pem" in line


# --------------------------------------------------------------------------------------------------
# The build context


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) of each .dockerignore line, in order (Docker: the last pattern that matches wins)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip("/")
        regex = re.escape(line).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        patterns.append((negated, re.compile(regex.replace(r"\?", "[^/]") + "$")))
    return patterns


def ignored(relative: str, patterns) -> bool:
    """Whether Docker leaves `relative` out of the context: a pattern matches the path or one of its parents."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    state = False
    for negated, pattern in patterns:
        if any(pattern.match(prefix) for prefix in prefixes):
            state = not negated
    return state


def build_context() -> list[str]:
    patterns = dockerignore_patterns()
    negated_roots = {p.pattern.split("/")[0] for negated, p in patterns if negated}
    files = []
    for path in sorted(ROOT.iterdir()):
        # Skip whole folders nothing re-includes (.venv, models, .git: big and all ignored).
        if path.is_dir() and ignored(path.name, patterns) and not any(path.name in r for r in negated_roots):
            continue
        candidates = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files += [str(p.relative_to(ROOT)) for p in candidates if not ignored(str(p.relative_to(ROOT)), patterns)]
    return files


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_big(tmp_path):
    patterns = dockerignore_patterns()
    for heavy in (".venv/bin/python", "models/repository/digits_cnn/1/model.onnx", "notebooks/01_train.ipynb",
                  "solutions/01_train.ipynb", ".git/HEAD", "tests/test_deploy.py", "src/ortserve/__pycache__/x.pyc",
                  "src/ortserve.egg-info/PKG-INFO", "Dockerfile", "deploy/deployment.yaml"):  # fmt: skip
        assert ignored(heavy, patterns), heavy
    context = build_context()
    copied = [src for name, args in dockerfile() if name == "COPY" and "--from" not in args
              for src in args.split()[:-1]]  # fmt: skip
    for source in copied:
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), source
    # The package builds from the context alone, with the files it needs.
    for relative in context:
        (tmp_path / "context" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / relative, tmp_path / "context" / relative)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path / "context")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("ortserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("ortserve/__main__.py", "ortserve/health.py", "ortserve/server/cli.py",
                   "ortserve/server/replicas.py", "ortserve/_proto/grpc_service_pb2.py"):  # fmt: skip
        assert module in names, module
