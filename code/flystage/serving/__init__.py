"""The serve image's code: SageMaker hosting with sagemaker-inference and multi-model-server.

- :mod:`flystage.serving.entrypoint`: the container's ``serve`` command (checks the model, then
  starts the model server);
- :mod:`flystage.serving.settings`: workers, threads, timeout and payload limit from the
  environment;
- :mod:`flystage.serving.codec`: request decoding and response encoding;
- :mod:`flystage.serving.handler` and :mod:`flystage.serving.handler_service`: what the model
  server's workers run;
- :mod:`flystage.serving.container`: start, wait for and stop a serve container (tests,
  benchmarks; needs the docker SDK).
"""
