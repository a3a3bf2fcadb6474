"""The SageMaker training program (``SAGEMAKER_PROGRAM=train_flystage.py``).

sagemaker-training's ``train`` command runs it from ``/opt/ml/code`` with the hyperparameters
as ``--key value`` arguments; everything else is ``flystage.training.train.main``.
"""

import sys

from flystage.training.train import main

if __name__ == "__main__":
    sys.exit(main())
