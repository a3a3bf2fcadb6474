"""Push the train and serve images to ECR, and find their URIs for the jobs.

The docker SDK's ``images.push`` does not raise when a push fails: the failure arrives as an
``error``/``errorDetail`` line in the stream, so every line is checked.

SageMaker's instances (ml.m5, ml.c5, ml.g4dn, ...) run linux/amd64: an image built on an arm64
machine (Apple silicon, Graviton) starts there with "exec format error". The image's own config
(``Os``/``Architecture``) is checked before anything is sent.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from typing import Any

from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings

# What `make images` builds (docker build --platform linux/amd64) and SageMaker runs.
PLATFORM = ("linux", "amd64")


def check_platform(image: Any, name: str) -> None:
    """CloudError unless the local image ``name`` is linux/amd64, read from its config."""
    os_, arch = image.attrs.get("Os") or "?", image.attrs.get("Architecture") or "?"
    if (os_, arch) != PLATFORM:
        variant = f"/{image.attrs['Variant']}" if image.attrs.get("Variant") else ""
        raise CloudError(
            f"local image {name} is {os_}/{arch}{variant}, but SageMaker runs "
            f"{'/'.join(PLATFORM)} images only: nothing was pushed. Rebuild it for "
            f"{'/'.join(PLATFORM)} with `make images` (it builds with `docker build --platform "
            f"{'/'.join(PLATFORM)}`; on an arm64 machine that needs QEMU emulation, e.g. the "
            "binfmt handlers of qemu-user-static), then push again"
        )


def _host(endpoint: str) -> str:
    """``https://123.dkr.ecr.r.amazonaws.com`` -> ``123.dkr.ecr.r.amazonaws.com``."""
    return endpoint.split("://", 1)[-1].rstrip("/")


def image_pairs(settings: Settings) -> list[tuple[str, str]]:
    """(local image, ECR repository) for the train and the serve image."""
    return [
        (settings.train_image, settings.train_repository),
        (settings.serve_image, settings.serve_repository),
    ]


def image_uri(api: Api, settings: Settings, repository: str) -> str:
    """``<registry>/<repository>:<tag>`` of a pushed image; CloudError if it was not pushed."""
    tag = settings.image_tag
    if settings.registry_override:
        return f"{_host(settings.registry_override)}/{repository}:{tag}"
    if api.dry_run:
        return f"<account-id>.dkr.ecr.{api.region}.amazonaws.com/{repository}:{tag}"
    try:
        repo = api.call("ecr", "describe_repositories", repositoryNames=[repository])[
            "repositories"
        ][0]
        api.call("ecr", "describe_images", repositoryName=repository, imageIds=[{"imageTag": tag}])
    except CloudError as err:
        if api.error_code(err) in ("RepositoryNotFoundException", "ImageNotFoundException"):
            raise CloudError(
                f"image {repository}:{tag} is not in ECR ({api.region}): run `make push` first"
            ) from None
        raise
    return f"{repo['repositoryUri']}:{tag}"


def check_push_stream(lines: Iterable[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Consume a decoded ``images.push`` stream; raise CloudError on any error line."""
    seen = []
    for line in lines:
        seen.append(line)
        if "error" in line or "errorDetail" in line:
            detail = line.get("errorDetail", {}).get("message") or line.get("error")
            raise CloudError(f"push of {target} failed: {detail}")
    if not any("aux" in line or "digest" in str(line.get("status", "")) for line in seen):
        # A push that ends without a digest did not finish, whatever the daemon says.
        raise CloudError(
            f"push of {target} ended without a digest: {seen[-3:] if seen else 'no output'}"
        )
    return seen


def docker_engine(failure: Callable[[Exception], Exception]) -> Any:
    """A client of the local Docker engine (DOCKER_HOST etc. as the docker CLI reads them),
    pinged; ``failure(error)`` is raised (from None) when the engine does not answer."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        raise failure(err) from None
    return client


def push(api: Api, settings: Settings, docker_client: Any = None) -> dict[str, str]:
    """Create the repositories, log in with the ECR token, tag and push both images.

    Both local images must be linux/amd64 (``check_platform``), checked before any request.

    Returns {local image: pushed URI}. The registry is ECR's ``proxyEndpoint`` unless
    ``settings.registry_override`` names another (a local registry in tests).
    """
    if docker_client is None and not api.dry_run:
        docker_client = docker_engine(
            lambda err: CloudError(
                f"cannot reach the Docker engine ({err}): start it (dockerd) and retry"
            )
        )
    images = {} if api.dry_run else _local_images(docker_client, settings)
    _create_repositories(api, settings)
    token = api.call("ecr", "get_authorization_token")
    if api.dry_run:
        return _push_dry_run(api, settings)
    registry, credentials = _login(docker_client, settings, token)
    return {
        local: _push_image(
            api,
            docker_client,
            images[local],
            local,
            f"{registry}/{repository}",
            settings.image_tag,
            credentials,
        )
        for local, repository in image_pairs(settings)
    }


def _local_images(docker_client: Any, settings: Settings) -> dict[str, Any]:
    """The two local images, each checked linux/amd64."""
    import docker

    images = {}
    for local, _ in image_pairs(settings):
        try:
            images[local] = docker_client.images.get(local)
        except docker.errors.ImageNotFound:
            raise CloudError(
                f"local image {local} not found: build it with `make images`"
            ) from None
        check_platform(images[local], local)
    return images


def _create_repositories(api: Api, settings: Settings) -> None:
    """Create both ECR repositories (scan on push, tagged); one that exists is kept."""
    for _, repository in image_pairs(settings):
        try:
            api.call(
                "ecr",
                "create_repository",
                repositoryName=repository,
                imageScanningConfiguration={"scanOnPush": True},
                tags=settings.tag_list(),
            )
            api.say(f"created ECR repository {repository}")
        except CloudError as err:
            if api.error_code(err) != "RepositoryAlreadyExistsException":
                raise


def _push_dry_run(api: Api, settings: Settings) -> dict[str, str]:
    """The pushes a real run would make, as dry-run calls; the URIs they would give."""
    registry = (
        _host(settings.registry_override)
        if settings.registry_override
        else f"<account-id>.dkr.ecr.{api.region}.amazonaws.com"
    )
    uris = {}
    for local, repository in image_pairs(settings):
        uri = f"{registry}/{repository}:{settings.image_tag}"
        api.call(
            "docker",
            "push",
            image=local,
            repository=uri.rsplit(":", 1)[0],
            tag=settings.image_tag,
        )
        uris[local] = uri
    return uris


def _login(docker_client: Any, settings: Settings, token: dict) -> tuple[str, dict[str, str]]:
    """Log the Docker client in to the registry with the ECR token: (registry host,
    credentials for each push)."""
    import docker

    auth = token["authorizationData"][0]
    username, password = base64.b64decode(auth["authorizationToken"]).decode().split(":", 1)
    registry = _host(settings.registry_override or auth["proxyEndpoint"])
    try:
        docker_client.login(username=username, password=password, registry=registry, reauth=True)
    except docker.errors.APIError as err:
        raise CloudError(f"docker login to {registry} failed: {err.explanation or err}") from None
    return registry, {"username": username, "password": password}


def _push_image(
    api: Api,
    docker_client: Any,
    image: Any,
    local: str,
    target: str,
    tag: str,
    credentials: dict[str, str],
) -> str:
    """Tag ``image`` (named ``local``) as ``target:tag`` and push it; the pushed URI."""
    import docker

    if not image.tag(target, tag=tag):
        raise CloudError(f"could not tag {local} as {target}:{tag}")
    api.say(f"pushing {local} -> {target}:{tag}")
    try:
        stream = docker_client.images.push(
            target, tag=tag, stream=True, decode=True, auth_config=credentials
        )
        check_push_stream(stream, f"{target}:{tag}")
    except docker.errors.APIError as err:
        raise CloudError(f"push of {target}:{tag} failed: {err.explanation or err}") from None
    return f"{target}:{tag}"
