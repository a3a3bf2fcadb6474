"""make push: ECR repositories and login token from moto, a real push to Debian's
docker-registry on loopback standing in for ECR, and failed pushes reported as failures.
An image that is not linux/amd64 (a real arm64 image in the local engine) is refused before
anything is sent, and the images `make images` built are linux/amd64."""

from __future__ import annotations

import io
import json
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from cloud_helpers import (  # fixtures are used as test parameters
    aws,
    docker_client,
    foreign_image,
    free_port,
    moto_url,
    start_registry,
    tiny_image,
)
from flystage.cloud import ecr
from flystage.cloud.settings import CloudError

pytestmark = pytest.mark.docker


@pytest.fixture
def images(tmp_path):
    """Two tiny local images standing in for flystage-train/serve; every tag made from
    them (local and registry) is removed afterwards."""
    client = docker_client()
    suffix = uuid.uuid4().hex[:8]
    tags = {
        "train": f"flystage-push-test-train:{suffix}",
        "serve": f"flystage-push-test-serve:{suffix}",
    }
    made = [tiny_image(client, tag, tmp_path) for tag in tags.values()]
    yield client, tags
    for image in made:
        for tag in client.images.get(image.id).tags:
            client.images.remove(tag, force=True)


def push_settings(settings, tags, registry, suffix_tag="latest"):
    return settings.replace(
        train_image=tags["train"],
        serve_image=tags["serve"],
        registry_override=registry,
        train_repository="lab/flystage-train",
        serve_repository="lab/flystage-serve",
        image_tag=suffix_tag,
    )


def test_push_to_a_local_registry(aws, images, start_registry):
    api, settings = aws
    local_registry = start_registry()
    client, tags = images
    api.out = io.StringIO()
    settings = push_settings(settings, tags, local_registry, "v1")
    uris = ecr.push(api, settings, client)
    assert uris == {
        tags["train"]: f"{local_registry}/lab/flystage-train:v1",
        tags["serve"]: f"{local_registry}/lab/flystage-serve:v1",
    }
    # The repositories exist in (moto's) ECR, and the registry really holds both images.
    names = {r["repositoryName"] for r in api.call("ecr", "describe_repositories")["repositories"]}
    assert names == {"lab/flystage-train", "lab/flystage-serve"}
    catalog = json.load(urllib.request.urlopen(f"http://{local_registry}/v2/_catalog", timeout=10))
    assert sorted(catalog["repositories"]) == ["lab/flystage-serve", "lab/flystage-train"]
    for repo in catalog["repositories"]:
        listed = json.load(
            urllib.request.urlopen(f"http://{local_registry}/v2/{repo}/tags/list", timeout=10)
        )
        assert listed["tags"] == ["v1"]
    # Pushing again is fine: the repositories exist already (RepositoryAlreadyExistsException).
    assert ecr.push(api, settings, client) == uris
    assert "created ECR repository" in api.out.getvalue()
    # The jobs then name exactly these URIs.
    assert ecr.image_uri(api, settings, settings.train_repository) == uris[tags["train"]]


def test_push_to_a_registry_that_refuses_fails_loudly(aws, images, start_registry):
    """The login succeeds, the push is refused (a read-only registry): a CloudError with the
    registry's own error text, not a silent success."""
    api, settings = aws
    client, tags = images
    api.out = io.StringIO()
    registry = start_registry(readonly=True)
    with pytest.raises(
        CloudError, match=rf"push of {registry}/lab/flystage-train:latest failed: .*HTTP 405"
    ):
        ecr.push(api, push_settings(settings, tags, registry), client)
    assert "pushing" in api.out.getvalue()


def test_registry_that_is_not_there_fails_loudly(aws, images):
    api, settings = aws
    client, tags = images
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(CloudError, match=rf"docker login to {dead} failed: .*connection refused"):
        ecr.push(api, push_settings(settings, tags, dead), client)


def test_push_error_lines_in_the_stream_are_failures():
    """The daemon reports a refused push as a stream line, not an exception."""
    lines = [
        {"status": "The push refers to repository [127.0.0.1:5000/x]"},
        {"status": "Preparing", "progressDetail": {}, "id": "abc"},
        {
            "errorDetail": {"message": "denied: requested access to the resource is denied"},
            "error": "denied: requested access",
        },
    ]
    with pytest.raises(
        CloudError,
        match="push of 127.0.0.1:5000/x:latest failed: "
        "denied: requested access to the resource is denied",
    ):
        ecr.check_push_stream(iter(lines), "127.0.0.1:5000/x:latest")
    with pytest.raises(CloudError, match="ended without a digest"):
        ecr.check_push_stream(iter(lines[:2]), "127.0.0.1:5000/x:latest")


def test_missing_local_image_says_build_it(aws):
    api, settings = aws
    client = docker_client()
    settings = settings.replace(train_image=f"flystage-no-such-image:{uuid.uuid4().hex[:8]}")
    with pytest.raises(CloudError, match="not found: build it with `make images`"):
        ecr.push(api, settings, client)


@pytest.mark.parametrize("os_name, architecture", [("linux", "arm64"), ("linux", "s390x")])
def test_image_that_is_not_linux_amd64_is_refused_before_anything_is_sent(
    aws, images, start_registry, tmp_path, os_name, architecture
):
    """An arm64 image (hand-made `docker save` tarball, `docker load`ed: the engine really holds
    it as linux/arm64) as the serve image: refused with how to rebuild, before any repository
    is created, any login or any push, even of the good train image."""
    api, settings = aws
    client, tags = images
    registry = start_registry()
    foreign = f"flystage-push-test-foreign:{uuid.uuid4().hex[:8]}"
    image = foreign_image(client, foreign, architecture=architecture, os_name=os_name)
    try:
        assert (image.attrs["Os"], image.attrs["Architecture"]) == (os_name, architecture)
        api.out = io.StringIO()
        with pytest.raises(CloudError) as refused:
            ecr.push(api, push_settings(settings, {**tags, "serve": foreign}, registry), client)
        message = str(refused.value)
        assert f"local image {foreign} is {os_name}/{architecture}" in message
        assert (
            "nothing was pushed" in message
            and "make images" in message
            and "--platform linux/amd64" in message
        )
        # Nothing was sent: no ECR repository, nothing in the registry, no tag made for it.
        assert api.call("ecr", "describe_repositories")["repositories"] == []
        catalog = json.load(urllib.request.urlopen(f"http://{registry}/v2/_catalog", timeout=10))
        assert catalog["repositories"] == []
        assert "pushing" not in api.out.getvalue()
        assert client.images.get(foreign).tags == [foreign]
        assert client.images.get(tags["train"]).tags == [tags["train"]]
    finally:
        client.images.remove(foreign, force=True)


def test_check_platform_reads_the_image_config():
    class Image:
        def __init__(self, **attrs):
            self.attrs = attrs

    ecr.check_platform(Image(Os="linux", Architecture="amd64"), "x:1")
    with pytest.raises(
        CloudError, match=r"local image x:1 is linux/arm64/v8, but SageMaker runs linux/amd64"
    ):
        ecr.check_platform(Image(Os="linux", Architecture="arm64", Variant="v8"), "x:1")
    with pytest.raises(CloudError, match=r"local image x:1 is \?/\?"):
        ecr.check_platform(Image(), "x:1")


def test_the_built_images_are_linux_amd64():
    """What `make images` built (and `make push` would push) runs on SageMaker's instances."""
    client = docker_client()
    import docker

    for tag in (
        os.environ.get("TRAIN_IMAGE", "flystage-train:latest"),
        os.environ.get("SERVE_IMAGE", "flystage-serve:latest"),
    ):
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{tag} not built: run `make images` first")
        assert (image.attrs["Os"], image.attrs["Architecture"]) == ("linux", "amd64"), tag
        ecr.check_platform(image, tag)


def test_the_image_build_refuses_an_image_that_is_not_linux_amd64():
    """`make images` ends with docker/build-offline.sh's platform check (the classic builder
    keeps a local base image of another platform whatever --platform says): an arm64 image
    under the serve image's name fails it, with the image named."""
    client = docker_client()
    foreign = f"flystage-push-test-foreign:{uuid.uuid4().hex[:8]}"
    foreign_image(client, foreign)
    script = Path(__file__).resolve().parents[1] / "docker" / "build-offline.sh"
    try:
        done = subprocess.run(
            [str(script), "check"],
            env={**os.environ, "SERVE_IMAGE": foreign, "BUILD_IMAGES": "serve"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert f"{foreign} is linux/arm64, not linux/amd64" in done.stderr
    finally:
        client.images.remove(foreign, force=True)
