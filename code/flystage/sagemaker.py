"""flystage for users of the SageMaker Python SDK (Studio notebooks, scripts).

What an SDK user would otherwise copy by hand, each from the one place flystage defines it:

- :data:`METRIC_DEFINITIONS`, :data:`OBJECTIVE_METRIC`: the regexes SageMaker reads the
  training log with (``flystage.jobdef``, the same ones ``make tune`` sends);
- :func:`hyperparameter_ranges`: what a tuning job searches for the model the static
  hyperparameters train (``flystage.jobdef.tuning_ranges``, as ``make tune`` does): ``probe_l2``
  (0.01-10 on a log scale) and ``probe_columns`` (1 or 3) for the default model, an exactly
  solved probe; ``learning_rate`` (0.001-0.1, log) and ``batch_size`` (32-256) for the
  gradient-trained modes (``probe_solver=sgd``, ``mode=finetune``, networks trained from
  scratch). As the SDK's ``ContinuousParameter``/``CategoricalParameter``/``IntegerParameter``
  objects when the SDK is installed, else the CreateHyperParameterTuningJob dicts. An exact
  probe gives the same model at the same point, so its search is worth at most
  ``flystage.jobdef.trial_budget`` trials: give the tuner ``max_jobs`` no larger;
- :func:`image_uris`: the train and serve images from the settings (``flystage.toml`` /
  ``FLYSTAGE_*``): the local tags for ``instance_type="local"``, the ECR URIs otherwise;
- :func:`folder_hyperparameters`: the folder-channel rules (``label_regex``, ``label_level``,
  ``group_regex``) as hyperparameters, with BDGP's ``<gene>/<stage>/`` rule as an example;
- :class:`ImageSerializer`, :class:`TopKDeserializer` and ``FlystagePredictor`` (an SDK
  ``Predictor``): TIFF/PNG/JPEG/BMP bytes or file paths in, the top-k ``(stage, probability)``
  pairs out, in the serve image's formats (``flystage.serving.codec``; the client side is
  ``flystage.serving.client``); ``FlystagePredictor.predict_folder`` writes the CSV/JSON of a
  folder and renames the files as ``flystage predict --rename`` does.

Importing this module does not need the SDK (``pip install 'flystage[sdk]'``); only the SDK
objects do, and they say so when it is missing.

Example (local mode; on AWS use ``ml.m5.xlarge`` and the ECR URIs)::

    from sagemaker.estimator import Estimator
    from flystage import sagemaker as fs

    train_uri, serve_uri = fs.image_uris(local=True)
    est = Estimator(image_uri=train_uri, role=fs.LOCAL_ROLE,
                    instance_count=1, instance_type="local",
                    hyperparameters=fs.folder_hyperparameters(group_regex=fs.GENE_GROUP),
                    metric_definitions=fs.METRIC_DEFINITIONS)
    est.fit({"train": "file:///data/bdgp-insitu"})
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flystage import jobdef
from flystage.serving.client import content_type, parse_answer, predict_each

METRIC_DEFINITIONS: list[dict[str, str]] = jobdef.METRIC_DEFINITIONS
OBJECTIVE_METRIC: str = jobdef.OBJECTIVE_METRIC
# The one input channel: a folder/prefix with manifest.csv, or a folder tree (label rules below).
DATA_CHANNEL = jobdef.DATA_CHANNEL
# BDGP-like trees <gene>/<stage>/<image>: the first folder (the gene) is the group.
GENE_GROUP = r"^(?P<group>[^/]+)/"
# Local mode never assumes a role, but the SDK's Estimator and Model want one.
LOCAL_ROLE = "arn:aws:iam::111111111111:role/flystage-local"
SDK_HINT = (
    "the SageMaker Python SDK is not installed: pip install 'flystage[sdk]' (sagemaker>=2.250,<3)"
)


def _sdk():
    try:
        import sagemaker  # the SDK (absolute import: this module is flystage.sagemaker)
    except ImportError as exc:
        raise ImportError(SDK_HINT) from exc
    return sagemaker


def sdk_available() -> bool:
    try:
        _sdk()
    except ImportError:
        return False
    return True


def _number(text: str) -> int | float:
    # "10" stays an int: the SDK writes the number back with str(), so the request then says
    # "10" as make tune's does, not "10.0".
    try:
        return int(text)
    except ValueError:
        return float(text)


def hyperparameter_ranges(
    as_sdk: bool | None = None, *, static: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The hyperparameters a tuning job searches for the model ``static`` (the Estimator's
    hyperparameters; default: none, the default model) trains, by name, from
    ``flystage.jobdef.tuning_ranges``.

    ``as_sdk`` None: SDK objects (``sagemaker.tuner.ContinuousParameter`` with
    ``scaling_type="Logarithmic"``, ``CategoricalParameter``, ``IntegerParameter``) when the
    SDK is installed, else the request dicts; True requires the SDK; False always gives dicts.
    """
    ranges = jobdef.tuning_ranges(static)
    if as_sdk is None:
        as_sdk = sdk_available()
    if not as_sdk:
        return {r["Name"]: dict(r) for kind in ranges.values() for r in kind}
    _sdk()
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, IntegerParameter

    out: dict[str, Any] = {}
    for r in ranges.get("ContinuousParameterRanges", []):
        out[r["Name"]] = ContinuousParameter(
            _number(r["MinValue"]),
            _number(r["MaxValue"]),
            scaling_type=r.get("ScalingType", "Auto"),
        )
    for r in ranges.get("IntegerParameterRanges", []):
        out[r["Name"]] = IntegerParameter(
            int(r["MinValue"]), int(r["MaxValue"]), scaling_type=r.get("ScalingType", "Auto")
        )
    for r in ranges.get("CategoricalParameterRanges", []):
        out[r["Name"]] = CategoricalParameter(list(r["Values"]))
    return out


def image_uris(settings: Any = None, *, local: bool = False, api: Any = None) -> tuple[str, str]:
    """(train image, serve image) from the settings (default: ``flystage.toml`` and ``FLYSTAGE_*``).

    ``local``: the local tags ``make images`` builds (for ``instance_type="local"``); else the
    ECR URIs of the pushed images (``flystage.cloud.ecr.image_uri``: checks they were pushed,
    needs AWS credentials; ``make push`` pushes them).
    """
    from flystage.cloud.settings import load_settings

    settings = settings or load_settings()
    if local:
        return settings.train_image, settings.serve_image
    from flystage.cloud import ecr
    from flystage.cloud.session import Api

    api = api or Api(settings)
    return (
        ecr.image_uri(api, settings, settings.train_repository),
        ecr.image_uri(api, settings, settings.serve_repository),
    )


def folder_hyperparameters(
    label_regex: str | None = None,
    label_level: int | None = None,
    group_regex: str | None = None,
    **others: Any,
) -> dict[str, Any]:
    """Hyperparameters for a folder channel (no manifest.csv), read as ``flystage organise``
    reads a folder: the label from the nearest stage-like folder, or ``label_regex`` /
    ``label_level``; the groups of the validation split from ``group_regex`` (the training
    program refuses to draw that split without one). ``others`` are passed through."""
    rules = {"label_regex": label_regex, "label_level": label_level, "group_regex": group_regex}
    return {**{k: v for k, v in rules.items() if v is not None}, **others}


def remove_local_containers(container_root: str | Path) -> int:
    """Remove the containers the SDK's local mode made under ``container_root`` (the
    ``local.container_root`` of a ``LocalSession``'s config, where its docker-compose projects
    live): finished training jobs stay behind as exited containers. Returns how many."""
    import docker

    label = "com.docker.compose.project.working_dir"
    root = str(Path(container_root).expanduser().resolve())
    removed = 0
    for container in docker.from_env().containers.list(all=True, filters={"label": label}):
        if container.labels.get(label, "").startswith(root):
            container.remove(force=True)
            removed += 1
    return removed


# ---- serializer, deserializer, predictor ------------------------------------------------------


def _body(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, Path)):
        return Path(data).expanduser().read_bytes()
    if hasattr(data, "read"):
        return data.read()
    raise TypeError(
        f"expected image bytes, a file path or a binary file, not {type(data).__name__}"
    )


class ImageSerializer:
    """An SDK serializer (``CONTENT_TYPE``, ``serialize``) for one image: bytes, a path or a
    binary file -> the file's bytes, sent raw. The serve image recognises TIFF, PNG, JPEG and
    BMP from the bytes; :class:`FlystagePredictor` also names each image's own MIME type."""

    CONTENT_TYPE = "application/x-image"  # one of flystage.serving.codec.GENERIC_TYPES

    @property
    def content_type(self) -> str:
        return self.CONTENT_TYPE

    def serialize(self, data: Any) -> bytes:
        return _body(data)


class TopKDeserializer:
    """An SDK deserializer (``ACCEPT``, ``deserialize``): the serve image's JSON answer ->
    ``[(stage, probability), ...]``, best first (``flystage.serving.client.parse_answer``). An image
    the model could not read raises ValueError with the server's message."""

    ACCEPT = ("application/json",)

    @property
    def accept(self) -> tuple[str, ...]:
        return self.ACCEPT

    def deserialize(
        self, stream: Any, content_type: str = "application/json"
    ) -> list[tuple[str, float]]:
        try:
            raw = stream.read() if hasattr(stream, "read") else stream
        finally:
            if hasattr(stream, "close"):
                stream.close()
        return parse_answer(raw)


def _predictor_class():
    _sdk()
    from sagemaker.predictor import Predictor

    from flystage.predict import add_output_arguments, run_with

    class FlystagePredictor(Predictor):
        """An SDK ``Predictor`` for a flystage endpoint (real or ``instance_type="local"``).

        ``predict(image)``: bytes, a path or a binary file -> ``[(stage, probability), ...]``
        (top 3; ``k=`` for more). Each image goes with its own MIME type. Also a
        ``flystage.predictor.SourcePredictor``: ``predict_folder`` writes the CSV/JSON of a
        folder and, with ``rename=True``, renames each file with its top-k (with an undo manifest).
        """

        def __init__(self, endpoint_name: str, sagemaker_session: Any = None, **kwargs: Any):
            kwargs.setdefault("serializer", ImageSerializer())
            kwargs.setdefault("deserializer", TopKDeserializer())
            super().__init__(endpoint_name, sagemaker_session=sagemaker_session, **kwargs)

        def predict(self, data: Any, initial_args: dict | None = None, k: int = 3, **kwargs: Any):
            body = self.serializer.serialize(data)
            args = {"ContentType": content_type(body), **(initial_args or {})}
            if k != 3:
                kwargs.setdefault("custom_attributes", f"k={k}")
            return super().predict(body, initial_args=args, **kwargs)

        def predict_sources(
            self, sources: Sequence[Any], k: int = 3, names: Sequence[str] | None = None
        ) -> list:
            def send(body: bytes, k: int) -> list[tuple[str, float]]:
                try:
                    return self.predict(body, k=k)
                except ValueError:
                    raise
                except (
                    Exception
                ) as err:  # the SDK's error for a 4xx (botocore's ModelError, local mode's own)
                    raise ValueError(
                        str(err).splitlines()[0] if str(err) else type(err).__name__
                    ) from None

            return predict_each(sources, send, k, names)

        def predict_folder(
            self,
            folder: str | Path,
            out: str | Path = "predictions.csv",
            *,
            rename: bool = False,
            k: int = 3,
            force: bool = False,
            unsure_below: float | None = None,
        ) -> int:
            """``flystage predict FOLDER --out OUT [--rename]`` through this endpoint: exit code 0
            when every image was predicted (and renamed), 1 when some were not; bad usage (an
            output that exists without ``force``, no images) raises
            ``flystage.predict.PredictError`` before any image is sent."""
            parser = argparse.ArgumentParser(prog="predict_folder")
            add_output_arguments(parser)
            argv = [str(folder), "--out", str(out), "--k", str(k)]
            argv += ["--rename"] * rename + ["--force"] * force
            argv += ["--unsure-below", str(unsure_below)] if unsure_below is not None else []
            return run_with(self, parser.parse_args(argv))

    return FlystagePredictor


def __getattr__(name: str) -> Any:
    # FlystagePredictor subclasses the SDK's Predictor: made on first use, so importing this
    # module does not need the SDK.
    if name == "FlystagePredictor":
        cls = _predictor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
