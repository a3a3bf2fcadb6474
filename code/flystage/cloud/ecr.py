"""Push the train and serve images to ECR, and find their URIs for the jobs.

The docker SDK's ``images.push`` does not raise when a push fails: the failure arrives as an
``error``/``errorDetail`` line in the stream, so every line is checked.

SageMaker's instances (ml.m5, ml.c5, ml.g4dn, ...) run linux/amd64: an image built on an arm64
machine (Apple silicon, Graviton) starts there with "exec format error". The image's own config
(``Os``/``Architecture``) is checked before anything is sent.

SageMaker's CreateTrainingJob/CreateModel accept Docker v2 schema 2 image manifests only: an OCI
image index (BuildKit's provenance/SBOM attestations) and even a single-platform OCI image
manifest (Docker's containerd image store) are answered "Unsupported manifest media type". The
pushed manifest is read back from the registry right after the push, and ECR's
``imageManifestMediaType`` is checked again before any job names the image.

Images are tagged by content (``img-`` + the local image ID as ``docker images`` shows it: the
same bytes always get the same tag), repositories are made with IMMUTABLE tags and a lifecycle
policy, and jobs name images by digest (``repo@sha256:...``), so a later push cannot change what
a running job, or a tuning job's later trials, run. ``make push`` records each pushed tag and
digest in the state file, where ``image_uri`` finds them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.state import read_state, update_state

# What `make images` builds (docker build --platform linux/amd64) and SageMaker runs.
PLATFORM = ("linux", "amd64")
# The one manifest media type SageMaker runs (Docker v2 schema 2).
DOCKER_V2_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# Where each refused media type usually comes from, for the refusal.
_REFUSED_MANIFESTS = {
    "application/vnd.oci.image.index.v1+json": (
        "an OCI image index (BuildKit's provenance/SBOM attestation manifests, or a "
        "multi-platform build)"
    ),
    "application/vnd.docker.distribution.manifest.list.v2+json": "a multi-platform manifest list",
    "application/vnd.oci.image.manifest.v1+json": (
        "an OCI image manifest (what Docker's containerd image store pushes)"
    ),
    "application/vnd.docker.distribution.manifest.v1+prettyjws": (
        "a Docker v2 schema 1 manifest (Docker before 1.10)"
    ),
}
_INDEX_AND_OCI_MANIFESTS = [t for t in _REFUSED_MANIFESTS if "prettyjws" not in t]
# Content tags: the prefix, then the 12 hex digits of the local image ID.
CONTENT_TAG_PREFIX = "img-"
# Untagged images (a moved tag in a MUTABLE repository, a refused index's children) expire this
# long after their push: longer than a tuning job with the default limits runs (20 trials, 2 at
# a time, up to 8 h each with spot), since a pinned job pulls its image by digest at each start.
UNTAGGED_EXPIRY_DAYS = 14
LIFECYCLE_POLICY = {
    "rules": [
        {
            "rulePriority": 1,
            "description": f"untagged images expire {UNTAGGED_EXPIRY_DAYS} days after their push",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": UNTAGGED_EXPIRY_DAYS,
            },
            "action": {"type": "expire"},
        }
    ]
}


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


def check_manifest_media_type(media_type: str, ref: str, repository: str, tag: str) -> None:
    """CloudError unless ``media_type`` (the pushed manifest's) is Docker v2 schema 2."""
    if media_type == DOCKER_V2_MANIFEST:
        return
    what = _REFUSED_MANIFESTS.get(media_type, "a manifest type SageMaker does not run")
    raise CloudError(
        f"image {ref} has manifest media type {media_type or '(none)'}, {what}: SageMaker "
        f"accepts Docker v2 schema 2 manifests only ({DOCKER_V2_MANIFEST}) and answers others "
        "with 'Unsupported manifest media type', so no job or model was created. Rebuild with "
        "`make images` (with buildx it passes --provenance=false --sbom=false; Docker's "
        "containerd image store pushes OCI manifests whatever the flags: turn it off first, in "
        "Docker Desktop's Settings > General 'Use containerd for pulling and storing images', "
        'or with "features": {"containerd-snapshotter": false} in /etc/docker/daemon.json), '
        f"then `make push`. The refused image can be deleted: aws ecr batch-delete-image "
        f"--repository-name {repository} --image-ids imageTag={tag}"
    )


def content_tag(image: Any) -> str:
    """``img-`` + the 12 hex digits ``docker images`` shows for ``image``'s ID."""
    return CONTENT_TAG_PREFIX + image.id.split(":", 1)[-1][:12]


def _host(endpoint: str) -> str:
    """``https://123.dkr.ecr.r.amazonaws.com`` -> ``123.dkr.ecr.r.amazonaws.com``."""
    return endpoint.split("://", 1)[-1].rstrip("/")


def image_pairs(settings: Settings) -> list[tuple[str, str]]:
    """(local image, ECR repository) for the train and the serve image."""
    return [
        (settings.train_image, settings.train_repository),
        (settings.serve_image, settings.serve_repository),
    ]


def pushed_record(settings: Settings, target: str) -> dict[str, str]:
    """{"tag", "digest"} last pushed to ``target`` (``registry/repository``), or {}."""
    return read_state(settings.state_file).get("images", {}).get(target, {})


def record_push(settings: Settings, target: str, tag: str, digest: str) -> None:
    """Keep ``tag`` and ``digest`` as what was last pushed to ``target``."""
    images = read_state(settings.state_file).get("images", {})
    update_state(settings.state_file, images={**images, target: {"tag": tag, "digest": digest}})


def image_uri(api: Api, settings: Settings, repository: str) -> str:
    """``<registry>/<repository>@sha256:<digest>`` of the image ``make push`` pushed (or of
    ``settings.image_tag`` when set); CloudError if it is not in ECR, or its manifest is one
    SageMaker refuses. Every job target calls this before creating anything."""
    if settings.registry_override:
        return _override_uri(settings, repository)
    if api.dry_run:
        return (
            f"<account-id>.dkr.ecr.{api.region}.amazonaws.com/{repository}"
            "@sha256:<digest of the pushed image>"
        )
    repository_uri = _describe(
        api, "describe_repositories", repository, repositoryNames=[repository]
    )["repositories"][0]["repositoryUri"]
    recorded = pushed_record(settings, repository_uri)
    tag = settings.image_tag or recorded.get("tag")
    if not tag:
        raise CloudError(
            f"no pushed image of {repository} is recorded in {settings.state_file}: run "
            "`make push` first (or set image_tag to a tag that is in ECR)"
        )
    # The recorded digest when the tag is the recorded one: what this checkout pushed.
    image_id = (
        {"imageDigest": recorded["digest"]} if recorded.get("tag") == tag else {"imageTag": tag}
    )
    detail = _describe(
        api,
        "describe_images",
        f"{repository}:{tag}",
        repositoryName=repository,
        imageIds=[image_id],
    )["imageDetails"][0]
    check_manifest_media_type(
        detail.get("imageManifestMediaType", ""), f"{repository_uri}:{tag}", repository, tag
    )
    return f"{repository_uri}@{detail['imageDigest']}"


def _describe(api: Api, operation: str, name: str, **request: Any) -> dict:
    """An ECR describe call; a missing repository or image says to push."""
    try:
        return api.call("ecr", operation, **request)
    except CloudError as err:
        if api.error_code(err) in ("RepositoryNotFoundException", "ImageNotFoundException"):
            raise CloudError(
                f"image {name} is not in ECR ({api.region}): run `make push` first"
            ) from None
        raise


def _override_uri(settings: Settings, repository: str) -> str:
    """The URI in a registry that is not ECR (tests, private set-ups): by the recorded digest;
    an ``image_tag`` that was not pushed from here is named as it is, unchecked."""
    target = f"{_host(settings.registry_override)}/{repository}"
    recorded = pushed_record(settings, target)
    if settings.image_tag and recorded.get("tag") != settings.image_tag:
        return f"{target}:{settings.image_tag}"
    if not recorded:
        raise CloudError(
            f"no pushed image of {target} is recorded in {settings.state_file}: run "
            "`make push` first"
        )
    return f"{target}@{recorded['digest']}"


def check_push_stream(lines: Iterable[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Consume a decoded ``images.push`` stream; raise CloudError on any error line."""
    seen = []
    for line in lines:
        seen.append(line)
        if "error" in line or "errorDetail" in line:
            detail = line.get("errorDetail", {}).get("message") or line.get("error")
            hint = (
                ": the repository's tags are IMMUTABLE; leave image_tag unset (images are then "
                "tagged by content) or choose a new image_tag"
                if "immutable" in str(detail).lower()
                else ""
            )
            raise CloudError(f"push of {target} failed: {detail}{hint}")
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
    """Make the repositories (IMMUTABLE tags, lifecycle policy), push both images tagged by
    content (or ``settings.image_tag``), check and record what was pushed.

    Both local images must be linux/amd64 (``check_platform``), checked before any request.
    An image ECR already holds under its tag is not pushed again.

    Returns {local image: pushed URI, pinned to its digest}. The registry is ECR's
    ``proxyEndpoint`` unless ``settings.registry_override`` names another (a local registry
    in tests).
    """
    if docker_client is None and not api.dry_run:
        docker_client = docker_engine(
            lambda err: CloudError(
                f"cannot reach the Docker engine ({err}): start it (dockerd) and retry"
            )
        )
    images = {} if api.dry_run else _local_images(docker_client, settings)
    repositories = _prepare_repositories(api, settings)
    if api.dry_run:
        api.call("ecr", "get_authorization_token")
        return _push_dry_run(api, settings)
    login = _lazy_login(api, docker_client, settings)
    return {
        local: _push_or_reuse(
            api,
            settings,
            docker_client,
            images[local],
            local,
            repository,
            repositories[repository],
            login,
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


def _prepare_repositories(api: Api, settings: Settings) -> dict[str, dict]:
    """Create both repositories with IMMUTABLE tags (one that exists is kept, a MUTABLE one with
    a warning) and give each the lifecycle policy; {name: ECR's description ({} in a dry run)}."""
    described = {}
    for _, repository in image_pairs(settings):
        try:
            made = api.call(
                "ecr",
                "create_repository",
                repositoryName=repository,
                imageTagMutability="IMMUTABLE",
                imageScanningConfiguration={"scanOnPush": True},
                tags=settings.tag_list(),
            )
            described[repository] = made["repository"] if made else {}
            api.say(
                f"would create ECR repository {repository} (IMMUTABLE tags) unless it exists"
                if api.dry_run
                else f"created ECR repository {repository} (IMMUTABLE tags)"
            )
        except CloudError as err:
            if api.error_code(err) != "RepositoryAlreadyExistsException":
                raise
            described[repository] = _existing_repository(api, repository)
        _ensure_lifecycle_policy(api, repository)
    return described


def _existing_repository(api: Api, repository: str) -> dict:
    """ECR's description of an existing repository; a MUTABLE one is kept, with a warning
    (changing it is the owner's decision: other tools may move its tags)."""
    found = api.call("ecr", "describe_repositories", repositoryNames=[repository])
    mutability = found["repositories"][0].get("imageTagMutability", "MUTABLE")
    if mutability.startswith("MUTABLE"):
        api.say(
            f"warning: ECR repository {repository} has {mutability} tags, kept as it is: a push "
            "can move a tag there (jobs are pinned to digests, so running ones are not "
            "affected). To make it immutable: aws ecr put-image-tag-mutability "
            f"--repository-name {repository} --image-tag-mutability IMMUTABLE"
        )
    return found["repositories"][0]


def _ensure_lifecycle_policy(api: Api, repository: str) -> None:
    """Put LIFECYCLE_POLICY on ``repository`` unless it has a policy; another policy is kept."""
    text = json.dumps(LIFECYCLE_POLICY, sort_keys=True)
    if not api.dry_run:
        try:
            current = api.call("ecr", "get_lifecycle_policy", repositoryName=repository)
        except CloudError as err:
            if api.error_code(err) != "LifecyclePolicyNotFoundException":
                raise
        else:
            if json.loads(current["lifecyclePolicyText"]) != LIFECYCLE_POLICY:
                api.say(
                    f"ECR repository {repository} keeps its own lifecycle policy (not replaced): "
                    f"check that it expires untagged images, as ours would after "
                    f"{UNTAGGED_EXPIRY_DAYS} days"
                )
            return
    api.call("ecr", "put_lifecycle_policy", repositoryName=repository, lifecyclePolicyText=text)
    if not api.dry_run:
        api.say(
            f"lifecycle policy on {repository}: untagged images expire {UNTAGGED_EXPIRY_DAYS} "
            "days after their push"
        )


def _push_dry_run(api: Api, settings: Settings) -> dict[str, str]:
    """The pushes a real run would make, as dry-run calls; the URIs they would give."""
    registry = (
        _host(settings.registry_override)
        if settings.registry_override
        else f"<account-id>.dkr.ecr.{api.region}.amazonaws.com"
    )
    uris = {}
    for local, repository in image_pairs(settings):
        tag = settings.image_tag or f"{CONTENT_TAG_PREFIX}<ID of {local}>"
        api.call("docker", "push", image=local, repository=f"{registry}/{repository}", tag=tag)
        uris[local] = f"{registry}/{repository}@sha256:<digest of the pushed image>"
    return uris


def _lazy_login(api: Api, docker_client: Any, settings: Settings) -> Callable[[], tuple]:
    """A function that logs in on its first call (none if every image is in ECR already) and
    returns (registry host, credentials) each time."""
    done: list[tuple[str, dict[str, str]]] = []

    def login() -> tuple[str, dict[str, str]]:
        if not done:
            done.append(_login(docker_client, settings, api.call("ecr", "get_authorization_token")))
        return done[0]

    return login


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


def _push_or_reuse(
    api: Api,
    settings: Settings,
    docker_client: Any,
    image: Any,
    local: str,
    repository: str,
    described: dict,
    login: Callable[[], tuple],
) -> str:
    """Push ``image`` to ``repository`` (``described`` by ECR) unless ECR holds it under its
    tag already; check the manifest's media type, record tag and digest; the URI pinned to the
    digest."""
    tag = settings.image_tag or content_tag(image)
    mutability = described.get("imageTagMutability", "IMMUTABLE")
    held = None if settings.registry_override else _in_ecr(api, repository, tag, image, mutability)
    if held:
        target = described["repositoryUri"]
        api.say(f"{local} is in ECR already as {repository}:{tag}: not pushed again")
        media_type, digest = held["imageManifestMediaType"], held["imageDigest"]
    else:
        registry, credentials = login()
        # ECR's own name for the repository, the key image_uri finds the record under.
        target = described.get("repositoryUri") if not settings.registry_override else None
        target = target or f"{registry}/{repository}"
        _push_image(api, docker_client, image, local, target, tag, credentials)
        media_type, digest = pushed_manifest(docker_client, f"{target}:{tag}", credentials)
    check_manifest_media_type(media_type, f"{target}:{tag}", repository, tag)
    record_push(settings, target, tag, digest)
    return f"{target}@{digest}"


def _in_ecr(api: Api, repository: str, tag: str, image: Any, mutability: str) -> dict | None:
    """ECR's image under ``tag`` if it is ``image`` (a content tag names its content; another tag
    is compared by config digest, the local image ID); None if the push must go on. A tag that
    holds another image in an IMMUTABLE repository is refused before pushing."""
    found = api.call(
        "ecr",
        "batch_get_image",
        repositoryName=repository,
        imageIds=[{"imageTag": tag}],
        # Every type a push may leave, so ECR answers with the stored manifest as it is.
        acceptedMediaTypes=[DOCKER_V2_MANIFEST, *_INDEX_AND_OCI_MANIFESTS],
    )["images"]
    if not found:
        return None
    held = found[0]
    config = json.loads(held.get("imageManifest") or "{}").get("config", {}).get("digest")
    if tag.startswith(CONTENT_TAG_PREFIX) or config == image.id:
        return {
            "imageDigest": held["imageId"]["imageDigest"],
            "imageManifestMediaType": held.get("imageManifestMediaType", ""),
        }
    if mutability.startswith("IMMUTABLE"):
        raise CloudError(
            f"tag {tag} of ECR repository {repository} holds another image, and its tags are "
            "IMMUTABLE: nothing was pushed. Leave image_tag unset (images are then tagged by "
            "content) or set a new image_tag"
        )
    return None


def pushed_manifest(docker_client: Any, ref: str, credentials: dict[str, str]) -> tuple[str, str]:
    """(media type, digest) of the manifest the registry now holds under ``ref``, read back
    through the engine (``docker buildx imagetools inspect`` would do the same)."""
    import docker

    try:
        descriptor = docker_client.images.get_registry_data(ref, auth_config=credentials).attrs[
            "Descriptor"
        ]
    except docker.errors.APIError as err:
        raise CloudError(
            f"pushed {ref}, but reading its manifest back failed: {err.explanation or err}"
        ) from None
    return descriptor.get("mediaType", ""), descriptor["digest"]


def _push_image(
    api: Api,
    docker_client: Any,
    image: Any,
    local: str,
    target: str,
    tag: str,
    credentials: dict[str, str],
) -> None:
    """Tag ``image`` (named ``local``) as ``target:tag`` and push it."""
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
