"""The handler service multi-model-server loads (``default_service_handler``).

multi-model-server imports this module and instantiates its one class; the class must be the
only one defined here.
"""

from __future__ import annotations

from sagemaker_inference.default_handler_service import DefaultHandlerService

from flystage.serving.handler import FlystageTransformer


class HandlerService(DefaultHandlerService):
    """sagemaker-inference's handler service running flystage's transformer."""

    def __init__(self) -> None:
        super().__init__(transformer=FlystageTransformer())
