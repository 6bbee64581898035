# The inference server alone: ONNX Runtime, gRPC and the ortserve package -- no torch, no Jupyter, no training
# code (requirements-server.txt). The models are not in the image: mount a model repository at /models
# (<name>/<version>/model.onnx, optional <name>/config.json; README "The server").
#
#   docker build -t ortserve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9001:9001 -p 8002:8002 -v "$PWD/models/repository:/models:ro" ortserve:0.1.0
#   docker run --rm ortserve:0.1.0 serve --help             # the image runs `python -m ortserve COMMAND`
#
# Kubernetes manifests for it: deploy/ (deploy/README.md).

# --- stage 1: install into a virtual environment (pip's build of the ortserve wheel stays in this stage)
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ortserve
COPY requirements-server.txt /tmp/requirements-server.txt
RUN /opt/ortserve/bin/pip install --no-cache-dir -r /tmp/requirements-server.txt
COPY pyproject.toml README.md /tmp/ortserve/
COPY src /tmp/ortserve/src
# The package's own dependencies are the pinned set above, hence --no-deps.
RUN /opt/ortserve/bin/pip install --no-cache-dir --no-deps /tmp/ortserve

# --- stage 2: the environment on a fresh base, run as an unprivileged user
FROM python:3.11-slim
LABEL org.opencontainers.image.title="ortserve" \
      org.opencontainers.image.description="gRPC inference server on ONNX Runtime: Open Inference Protocol (KServe v2), the old ONNX Runtime Server's PredictionService, grpc.health.v1" \
      org.opencontainers.image.version="0.1.0"
# A numeric user, so that Kubernetes' runAsNonRoot can check it without looking up names.
RUN groupadd --system --gid 10001 ortserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ortserve
COPY --from=build /opt/ortserve /opt/ortserve
ENV PATH=/opt/ortserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# gRPC (Open Inference Protocol, PredictionService, health, reflection), HTTP/REST, Prometheus metrics.
EXPOSE 50051 9001 8002
# Asks grpc.health.v1 on the gRPC port: unhealthy while the server starts, drains (SIGTERM) or hangs. A server
# started with --tls_cert needs --tls_ca (and, for mutual TLS, --tls_cert/--tls_key) here too: override it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "ortserve", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]
# SIGTERM (docker stop, Kubernetes) drains calls in flight for --grace_period seconds, then exits 0: keep
# `docker stop -t` / terminationGracePeriodSeconds above it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "ortserve"]
CMD ["serve", "--model_repository", "/models", "--address", "0.0.0.0", "--grpc_port", "50051", \
     "--http_port", "9001", "--metrics_port", "8002", "--grace_period", "10"]
