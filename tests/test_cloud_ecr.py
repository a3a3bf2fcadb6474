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
    ACCOUNT,
    REGION,
    aws,
    docker_client,
    foreign_image,
    free_port,
    moto_url,
    put_images,
    start_registry,
    tiny_image,
)
from flystage.cloud import ecr, hosting, training, tuning
from flystage.cloud.dryrun import DryRunApi
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.state import read_state

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


def registry_manifest(registry: str, repository: str, reference: str) -> tuple[str, str]:
    """(media type, digest) the registry itself reports for ``repository:reference``."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{reference}",
        method="HEAD",
        headers={"Accept": ", ".join([DOCKER_V2, *OTHER_MANIFESTS])},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.headers["Docker-Content-Digest"]


DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OTHER_MANIFESTS = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]


def test_push_to_a_local_registry(aws, images, start_registry):
    """Tagged by content, pinned to the digest the registry holds, recorded in the state file;
    the ECR repositories are made IMMUTABLE with the lifecycle policy."""
    api, settings = aws
    local_registry = start_registry()
    client, tags = images
    api.out = io.StringIO()
    settings = push_settings(settings, tags, local_registry, "")
    uris = ecr.push(api, settings, client)
    content = {
        which: "img-" + client.images.get(tags[which]).id.split(":")[1][:12]
        for which in ("train", "serve")
    }
    for which in ("train", "serve"):
        repository = f"lab/flystage-{which}"
        media_type, digest = registry_manifest(local_registry, repository, content[which])
        assert media_type == DOCKER_V2
        assert uris[tags[which]] == f"{local_registry}/{repository}@{digest}"
        assert read_state(settings.state_file)["images"][f"{local_registry}/{repository}"] == {
            "tag": content[which],
            "digest": digest,
        }
        # The jobs then name exactly these URIs.
        assert ecr.image_uri(api, settings, repository) == uris[tags[which]]
    # The repositories exist in (moto's) ECR, IMMUTABLE, each with the lifecycle policy.
    repositories = api.call("ecr", "describe_repositories")["repositories"]
    assert {r["repositoryName"]: r["imageTagMutability"] for r in repositories} == {
        "lab/flystage-train": "IMMUTABLE",
        "lab/flystage-serve": "IMMUTABLE",
    }
    for r in repositories:
        policy = api.call("ecr", "get_lifecycle_policy", repositoryName=r["repositoryName"])
        [rule] = json.loads(policy["lifecyclePolicyText"])["rules"]
        assert rule["selection"] == {
            "tagStatus": "untagged",
            "countType": "sinceImagePushed",
            "countUnit": "days",
            "countNumber": 14,
        }
        assert rule["action"] == {"type": "expire"}
    catalog = json.load(urllib.request.urlopen(f"http://{local_registry}/v2/_catalog", timeout=10))
    assert sorted(catalog["repositories"]) == ["lab/flystage-serve", "lab/flystage-train"]
    assert api.out.getvalue().count("created ECR repository") == 2
    # Pushing again is fine: the repositories exist already (RepositoryAlreadyExistsException),
    # their policy is kept, the same bytes get the same tag and digest.
    api.out = io.StringIO()
    assert ecr.push(api, settings, client) == uris
    assert "created ECR repository" not in api.out.getvalue()
    assert "lifecycle policy" not in api.out.getvalue()


def test_a_later_push_does_not_change_the_image_of_a_running_tuning_job(
    aws, images, start_registry, tmp_path
):
    """A tuning job names the train image by digest: after a push of other code under the same
    fixed tag (the local registry lets the tag move, as a MUTABLE ECR repository made before
    would), its later trials still get the first image, which the registry still holds; the
    next job gets the new one."""
    api, settings = aws
    registry = start_registry()
    client, tags = images
    api.out = io.StringIO()
    settings = push_settings(settings, tags, registry, "shared").replace(
        train_repository="flystage-train"
    )
    first = ecr.push(api, settings, client)[tags["train"]]
    assert "@sha256:" in first
    described = tuning.tune(api, settings, {"epochs": 1}, max_jobs=2, parallel_jobs=1, name="t-1")
    assert described["TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"] == first
    # Other code under the same local name, pushed under the same tag.
    old = client.images.get(tags["train"])
    new = tiny_image(client, tags["train"], tmp_path)
    try:
        second = ecr.push(api, settings, client)[tags["train"]]
        assert second != first and second.split("@")[0] == first.split("@")[0]
        assert registry_manifest(registry, "flystage-train", "shared")[1] == second.split("@")[1]
        described = api.call(
            "sagemaker", "describe_hyper_parameter_tuning_job", HyperParameterTuningJobName="t-1"
        )
        assert (
            described["TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"] == first
        )
        assert (
            registry_manifest(registry, "flystage-train", first.split("@")[1])[1]
            == (first.split("@")[1])
        )
        assert ecr.image_uri(api, settings, settings.train_repository) == second
    finally:
        for tag in client.images.get(new.id).tags:
            client.images.remove(tag, force=True)
        old.tag(tags["train"])  # the fixture removes it, once no pushed digest names it
        for reference in client.images.get(old.id).attrs["RepoDigests"]:
            client.images.remove(reference)


INDEX = "application/vnd.oci.image.index.v1+json"


def oci_index(child_digest: str, child_type: str = DOCKER_V2) -> str:
    """What BuildKit pushes with its default provenance attestation: an OCI index of the image
    manifest and an attestation manifest (``unknown/unknown``)."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [
                {
                    "mediaType": child_type,
                    "digest": child_digest,
                    "size": 100,
                    "platform": {"architecture": "amd64", "os": "linux"},
                },
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + "a" * 64,
                    "size": 100,
                    "annotations": {
                        "vnd.docker.reference.digest": child_digest,
                        "vnd.docker.reference.type": "attestation-manifest",
                    },
                    "platform": {"architecture": "unknown", "os": "unknown"},
                },
            ],
        }
    )


def v2_manifest(config_digest: str, media_type: str = DOCKER_V2) -> str:
    oci = media_type.startswith("application/vnd.oci")
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json"
                if oci
                else "application/vnd.docker.container.image.v1+json",
                "digest": config_digest,
                "size": 100,
            },
            "layers": [],
        }
    )


@pytest.mark.parametrize(
    "media_type", [INDEX, "application/vnd.oci.image.manifest.v1+json", "docker-list"]
)
@pytest.mark.parametrize("target", ["train", "deploy"])
def test_an_image_sagemaker_refuses_is_refused_before_any_job(aws, media_type, target):
    """The image a push left in ECR (and recorded) is an OCI index with an attestation manifest,
    a single-platform OCI manifest or a manifest list: training and deploy refuse it with how
    to rebuild, before any training job or model exists."""
    api, settings = aws
    if media_type == "docker-list":
        media_type = "application/vnd.docker.distribution.manifest.list.v2+json"
        manifest = oci_index("sha256:" + "b" * 64).replace(INDEX, media_type)
    elif media_type == INDEX:
        manifest = oci_index("sha256:" + "b" * 64)
    else:
        manifest = v2_manifest("sha256:" + "c" * 64, media_type)
    put_images(api, manifest, "v1", media_type)
    with pytest.raises(CloudError) as refused:
        if target == "train":
            training.train(api, settings, {"epochs": "1"})
        else:
            hosting.deploy(api, settings, f"s3://{settings.bucket}/flystage/output/m/model.tar.gz")
    message = str(refused.value)
    assert f"has manifest media type {media_type}" in message
    assert "Unsupported manifest media type" in message and "make images" in message
    assert "--provenance=false" in message and "make push" in message
    assert api.call("sagemaker", "list_training_jobs")["TrainingJobSummaries"] == []
    assert api.call("sagemaker", "list_models")["Models"] == []


def test_a_docker_v2_image_in_ecr_is_named_by_digest(aws):
    """What a job gets for an image ECR holds as a Docker v2 schema 2 manifest: the repository
    URI and ECR's digest of it, whether the tag is fixed (image_tag) or recorded by a push."""
    api, settings = aws
    api.call("ecr", "create_repository", repositoryName="flystage-train")
    manifest = v2_manifest("sha256:" + "d" * 64)
    put = api.call(
        "ecr", "put_image", repositoryName="flystage-train", imageManifest=manifest, imageTag="v2"
    )
    digest = put["image"]["imageId"]["imageDigest"]
    uri = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/flystage-train@{digest}"
    assert ecr.image_uri(api, settings.replace(image_tag="v2"), "flystage-train") == uri
    with pytest.raises(CloudError, match=r"no pushed image of flystage-train is recorded"):
        ecr.image_uri(api, settings, "flystage-train")
    ecr.record_push(settings, uri.split("@")[0], "v2", digest)
    assert ecr.image_uri(api, settings, "flystage-train") == uri


def test_the_pushed_manifest_is_read_back_from_the_registry(aws, images, start_registry):
    """Right after a push the manifest is read back from the registry: a tag that holds an OCI
    index with an attestation manifest (put there over the registry's HTTP API, as BuildKit
    pushes it) is seen as such and refused."""
    api, settings = aws
    client, tags = images
    registry = start_registry()
    api.out = io.StringIO()
    pushed = ecr.push(api, push_settings(settings, tags, registry, "v1"), client)
    child = pushed[tags["train"]].split("@")[1]
    request = urllib.request.Request(
        f"http://{registry}/v2/lab/flystage-train/manifests/attested",
        data=oci_index(child).replace("sha256:" + "a" * 64, child).encode(),
        method="PUT",
        headers={"Content-Type": INDEX},
    )
    urllib.request.urlopen(request, timeout=10)
    media_type, digest = ecr.pushed_manifest(
        client, f"{registry}/lab/flystage-train:attested", {"username": "", "password": ""}
    )
    assert (media_type, digest) == registry_manifest(registry, "lab/flystage-train", "attested")
    assert media_type == INDEX
    with pytest.raises(CloudError, match="an OCI image index .*attestation"):
        ecr.check_manifest_media_type(media_type, "x:attested", "lab/flystage-train", "attested")
    assert ecr.pushed_manifest(
        client, f"{registry}/lab/flystage-train:v1", {"username": "", "password": ""}
    ) == (DOCKER_V2, child)


def test_an_image_ecr_holds_is_not_pushed_again(aws, images):
    """ECR (moto) holds the local image under its content tag, as a push left it: push() sends
    nothing (no login: moto's registry address does not even resolve) and names it by ECR's
    digest. A fixed tag that holds another image in an IMMUTABLE repository is refused before
    any push."""
    api, settings = aws
    client, tags = images
    api.out = io.StringIO()
    settings = settings.replace(train_image=tags["train"], serve_image=tags["serve"])
    digests = {}
    for which in ("train", "serve"):
        image = client.images.get(tags[which])
        repository = f"flystage-{which}"
        api.call("ecr", "create_repository", repositoryName=repository)
        put = api.call(
            "ecr",
            "put_image",
            repositoryName=repository,
            imageManifest=v2_manifest(image.id),
            imageTag=ecr.content_tag(image),
        )
        digests[which] = put["image"]["imageId"]["imageDigest"]
    uris = ecr.push(api, settings, client)
    registry = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    assert uris == {tags[w]: f"{registry}/flystage-{w}@{digests[w]}" for w in ("train", "serve")}
    assert "pushing" not in api.out.getvalue()
    assert api.out.getvalue().count("is in ECR already") == 2
    # MUTABLE repositories (made before) are kept, with a warning, and get the policy.
    assert api.out.getvalue().count("has MUTABLE tags, kept as it is") == 2
    assert api.out.getvalue().count("lifecycle policy on flystage-") == 2
    assert ecr.image_uri(api, settings, "flystage-serve") == uris[tags["serve"]]
    # A fixed tag holding other bytes in an IMMUTABLE repository.
    api.call("ecr", "create_repository", repositoryName="lab/t", imageTagMutability="IMMUTABLE")
    manifest = v2_manifest("sha256:" + "e" * 64)
    api.call("ecr", "put_image", repositoryName="lab/t", imageManifest=manifest, imageTag="v3")
    with pytest.raises(CloudError, match="tag v3 of ECR repository lab/t holds another image"):
        ecr.push(api, settings.replace(train_repository="lab/t", image_tag="v3"), client)


def test_a_repository_with_its_own_lifecycle_policy_keeps_it(aws, images, start_registry):
    api, settings = aws
    client, tags = images
    registry = start_registry()
    own = {
        "rules": [
            {
                "rulePriority": 1,
                "selection": {
                    "tagStatus": "any",
                    "countType": "imageCountMoreThan",
                    "countNumber": 50,
                },
                "action": {"type": "expire"},
            }
        ]
    }
    api.call("ecr", "create_repository", repositoryName="lab/flystage-train")
    api.call(
        "ecr",
        "put_lifecycle_policy",
        repositoryName="lab/flystage-train",
        lifecyclePolicyText=json.dumps(own),
    )
    api.out = io.StringIO()
    ecr.push(api, push_settings(settings, tags, registry, ""), client)
    kept = api.call("ecr", "get_lifecycle_policy", repositoryName="lab/flystage-train")
    assert json.loads(kept["lifecyclePolicyText"]) == own
    assert "lab/flystage-train keeps its own lifecycle policy" in api.out.getvalue()
    made = api.call("ecr", "get_lifecycle_policy", repositoryName="lab/flystage-serve")
    assert json.loads(made["lifecyclePolicyText"]) == ecr.LIFECYCLE_POLICY


def test_a_dry_run_push_says_what_it_would_create(capsys):
    """A dry run creates nothing, and says so: "would create", never "created"."""
    api = DryRunApi(Settings(region="eu-west-1"), out=io.StringIO())
    uris = ecr.push(api, Settings(region="eu-west-1"))
    err = capsys.readouterr().err
    assert "would create ECR repository flystage-train (IMMUTABLE tags)" in err
    assert "created" not in err
    sent = api.out.getvalue()
    assert sent.count('"operation": "create_repository"') == 2
    assert sent.count('"imageTagMutability": "IMMUTABLE"') == 2
    assert sent.count('"operation": "put_lifecycle_policy"') == 2
    assert uris["flystage-train:latest"].endswith(
        "/flystage-train@sha256:<digest of the pushed image>"
    )


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


BUILDX_PLUGIN = """#!/bin/sh
# A docker CLI plugin that answers as buildx does (this machine has none).
if [ "$1" = docker-cli-plugin-metadata ]; then
    echo '{"SchemaVersion": "0.1.0", "Vendor": "flystage test", "Version": "v0.0.0-test"}'
    exit 0
fi
echo "github.com/docker/buildx v0.0.0-test"
"""


@pytest.mark.parametrize(
    "plugin, buildkit, flags",
    [
        (False, None, ""),
        (True, None, "--provenance=false --sbom=false"),
        (True, "0", ""),
    ],
)
def test_the_image_build_turns_attestations_off_only_where_buildx_builds(
    tmp_path, plugin, buildkit, flags
):
    """`docker/build-offline.sh build-flags` (the Makefile's `docker build` lines use it): the
    attestation flags when the real docker CLI finds a buildx plugin (one answering as buildx,
    in a private DOCKER_CONFIG) and DOCKER_BUILDKIT does not ask for the classic builder, which
    would refuse them; nothing with this machine's classic builder."""
    config = tmp_path / "docker-config"
    (config / "cli-plugins").mkdir(parents=True)
    if plugin:
        buildx = config / "cli-plugins" / "docker-buildx"
        buildx.write_text(BUILDX_PLUGIN)
        buildx.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_BUILDKIT"}
    env["DOCKER_CONFIG"] = str(config)
    if buildkit is not None:
        env["DOCKER_BUILDKIT"] = buildkit
    script = Path(__file__).resolve().parents[1] / "docker" / "build-offline.sh"
    done = subprocess.run(
        [str(script), "build-flags"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == flags
