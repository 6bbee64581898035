# The model repository as an image, for the Deployment's init container (deployment.yaml) to copy into its pod:
# models then ship, version and roll back like any image. Build it from the repository directory:
#
#   docker build -f deploy/models.Dockerfile -t ortserve-models:0.1.0 models/repository
#
# The context holds <name>/<version>/model.onnx (+ <name>/config.json), e.g. `python -m ortserve models` builds the
# course's into models/repository.
FROM busybox:1.37
COPY . /models
USER 10001:10001
