"""The cloud half: ECR, S3 and SageMaker tuning, training, hosting and batch transform.

One module per job: ``settings`` (flystage.toml and environment overrides), ``session``
(boto3 clients), ``dryrun`` (print requests instead of sending them), ``ecr`` (push the
images), ``s3`` (upload the dataset), ``tuning``, ``training``, ``hosting`` (deploy,
teardown, the endpoint predictor), ``batch`` (batch transform) and ``command`` (the
``flystage cloud`` command line).
"""
