"""A served model version's configuration in Triton's JSON form (inference.ModelConfig, the model configuration
extension): what Triton's tools -- tritonclient's get_model_config, perf_analyzer -- read to learn how to call it.

Everything is read from what the server actually does with the model, not from its config file alone: the
batcher's size and delay when it batches (max_batch_size 0 when it does not, and then dims keep the batch axis,
as Triton's do), the runs that can be in flight at once as the instance count, the types and shapes from the
ONNX Runtime session. What the config file adds -- label files, warm-up requests -- is echoed.

REST sends the dict as it is (dims as JSON numbers, as Triton's HTTP endpoint does); the gRPC servicer parses it
into the message with json_format.ParseDict, so the two forms agree field for field.
"""

from __future__ import annotations

from ortserve.server import codec
from ortserve.server.repository import MODEL_FILE
from ortserve.server.runtime import Model, TensorSpec

PLATFORM = "onnxruntime_onnx"  # Triton's platform and backend names for ONNX models
BACKEND = "onnxruntime"


def tensor_config(spec: TensorSpec, batched: bool) -> dict:
    """{"name", "data_type", "dims"}: -1 for a variable axis, without the batch axis when the model batches."""
    dims = spec.dims()[1:] if batched else spec.dims()
    return {"name": spec.name, "data_type": codec.config_datatype(codec.datatype_of(spec.dtype)), "dims": dims}


def model_config(model: Model) -> dict:
    """The configuration of one served model version (see the module docstring)."""
    runner = model.runner
    max_batch_size = model.max_batch_size
    batched = max_batch_size > 0
    labels = model.config.label_files() if model.config is not None else {}
    outputs = []
    for spec in model.outputs.values():
        output = tensor_config(spec, batched)
        if spec.name in labels:
            output["label_filename"] = labels[spec.name]
        outputs.append(output)
    config = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"all": {}},  # the server serves every version folder it finds
        "max_batch_size": max_batch_size,
        "input": [tensor_config(spec, batched) for spec in model.inputs.values()],
        "output": outputs,
        "instance_group": [{"name": f"{model.name}_0", "kind": "KIND_CPU", "count": getattr(runner, "max_runs", 1)}],
        "default_model_filename": MODEL_FILE,
    }
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": round(runner.max_queue_delay * 1e6)}
    if model.config is not None and model.config.model_warmup:
        config["model_warmup"] = [warmup_config(w) for w in model.config.model_warmup]
    return config


def warmup_config(warmup) -> dict:
    """A repository.WarmupConfig as Triton's ModelWarmup (the input data's oneof: zero_data or random_data)."""
    inputs = {}
    for name, given in warmup.inputs.items():
        entry = {"data_type": codec.config_datatype(codec.protocol_datatype(given.data_type)), "dims": list(given.dims)}
        if given.zero_data:
            entry["zero_data"] = True
        elif given.random_data:
            entry["random_data"] = True
        inputs[name] = entry
    return {"name": warmup.name, "batch_size": warmup.batch_size, "inputs": inputs, "count": warmup.count}
