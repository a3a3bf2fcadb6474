"""flystage local mode: run the real train and serve images on this machine as SageMaker does.

One module per job:

- ``jobtree``: a CreateTrainingJob request -> the ``/opt/ml`` tree of each host.
- ``channels``: a lab's image folders -> a channel folder (``manifest.csv`` + images), the
  local stand-in for the S3 prefix a job reads.
- ``containers``: every Docker SDK call (networks, containers, labels, logs).
- ``training``: one local training job (1 or more hosts) from a request, with SageMaker's
  outputs (``model.tar.gz``, ``output/success`` or ``output/failure``).
- ``tuning``: a small hyperparameter search that launches one training job per trial.
- ``serving``: the serve image on a model artefact, and an HTTP predictor for it.

Run ``python -m flystage_local --help`` with ``local/`` on ``PYTHONPATH`` (the Makefile's
``local-*`` targets do).
"""

from flystage.errors import FlystageError


class LocalModeError(FlystageError, RuntimeError):
    """A local job or server that cannot run as asked; the message says what to do."""
