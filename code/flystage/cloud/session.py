"""boto3 clients for the cloud targets, with AWS errors turned into CloudError.

Every target talks to AWS through ``Api.call(service, operation, **request)``, so that the
dry run (``flystage.cloud.dryrun.DryRunApi``) can print the same requests instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from flystage.cloud.settings import CloudError, Settings

# What to do, by AWS error code; the AWS message is always shown too.
_ADVICE = {
    "AccessDenied": "give the operator the permissions in iam/operator-policy.json",
    "AccessDeniedException": "give the operator the permissions in iam/operator-policy.json",
    "UnrecognizedClientException": "check the AWS credentials (aws configure, or AWS_PROFILE)",
    "InvalidClientTokenId": "check the AWS credentials (aws configure, or AWS_PROFILE)",
    "ExpiredToken": "refresh the AWS credentials (aws sso login, or new session keys)",
    "ExpiredTokenException": "refresh the AWS credentials (aws sso login, or new session keys)",
    "ResourceLimitExceeded": (
        "ask AWS for a higher quota (Service Quotas, SageMaker) or lower instance_count"
    ),
    "NoSuchBucket": "create the bucket (aws s3 mb s3://BUCKET --region REGION) or fix `bucket`",
}


class Api:
    """Sends requests to AWS. ``dry_run`` is False: responses are real."""

    dry_run = False

    def __init__(self, settings: Settings, out: TextIO | None = None) -> None:
        self.settings = settings
        self.out = out or sys.stdout
        self._clients: dict[str, Any] = {}
        self._session = None

    def session(self):
        if self._session is None:
            import boto3

            self._session = boto3.Session(region_name=self.settings.region or None)
            if self._session.region_name is None:
                raise CloudError(
                    "no AWS region: set region in flystage.toml or FLYSTAGE_REGION (or AWS_REGION)"
                )
            if self._session.get_credentials() is None:
                raise CloudError(
                    "no AWS credentials found: run `aws configure` (or `aws sso login`), or set "
                    "AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                )
        return self._session

    @property
    def region(self) -> str:
        return self.session().region_name

    def client(self, service: str):
        """A cached boto3 client; ``settings.endpoint_url`` (tests, private endpoints) wins."""
        if service not in self._clients:
            kwargs = (
                {"endpoint_url": self.settings.endpoint_url} if self.settings.endpoint_url else {}
            )
            self._clients[service] = self.session().client(service, **kwargs)
        return self._clients[service]

    def call(self, service: str, operation: str, **request: Any) -> dict:
        """``client(service).<operation>(**request)``; AWS errors become CloudError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        method = getattr(self.client(service), operation)
        try:
            return method(**request)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            advice = _ADVICE.get(code)
            raise CloudError(
                f"{service} {operation} failed: {code}: "
                f"{err.response.get('Error', {}).get('Message', err)}"
                + (f"; {advice}" if advice else "")
            ) from err
        except NoCredentialsError as err:
            raise CloudError(
                "no AWS credentials found: run `aws configure` or set AWS_PROFILE"
            ) from err
        except BotoCoreError as err:
            raise CloudError(f"{service} {operation} failed: {err}") from err

    def error_code(self, err: BaseException) -> str:
        """The AWS error code behind a CloudError raised by ``call`` ('' if none)."""
        cause = err.__cause__
        response = getattr(cause, "response", None) or {}
        return response.get("Error", {}).get("Code", "")

    def wait(self, service: str, waiter: str, delay: float, **request: Any) -> None:
        """A boto3 waiter; a failure state becomes CloudError."""
        from botocore.exceptions import WaiterError

        try:
            self.client(service).get_waiter(waiter).wait(
                WaiterConfig={"Delay": max(1, int(delay)), "MaxAttempts": 100000}, **request
            )
        except WaiterError as err:
            raise CloudError(f"{service} {waiter}: {err}") from err

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
