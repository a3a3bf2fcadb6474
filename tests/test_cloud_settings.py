"""Settings: flystage.toml, FLYSTAGE_* overrides, and the errors that say what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flystage.cloud.settings import CloudError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_example_file_loads_and_has_placeholders_only(tmp_path):
    example = REPO / "flystage.toml.example"
    settings = load_settings(example, environ={})
    assert settings.instance_type == "ml.m5.xlarge"
    # The only account id in the example is the all-zero placeholder.
    assert set(re.findall(r"\d{12}", example.read_text())) == {"000000000000"}
    assert settings.tags["project"] == "flystage"


def test_file_then_environment_overrides(tmp_path):
    path = tmp_path / "flystage.toml"
    path.write_text(
        'region = "eu-west-1"\nbucket = "lab-bucket"\ninstance_count = 2\nspot = true\n'
        'max_runtime_s = 3600\nmax_wait_s = 7200\n[tags]\nproject = "flystage"\nlab = "dev-bio"\n'
    )
    settings = load_settings(
        path,
        environ={
            "FLYSTAGE_INSTANCE_COUNT": "3",
            "FLYSTAGE_SPOT": "off",
            "FLYSTAGE_TAGS": "a=1,b=2",
        },
    )
    assert (settings.region, settings.bucket, settings.instance_count, settings.spot) == (
        "eu-west-1",
        "lab-bucket",
        3,
        False,
    )
    assert settings.tags == {"a": "1", "b": "2"}
    assert settings.s3_uri("data", "x/") == "s3://lab-bucket/flystage/data/x"


def test_config_from_environment_variable(tmp_path):
    path = tmp_path / "other.toml"
    path.write_text('region = "us-east-2"\n')
    assert load_settings(environ={"FLYSTAGE_CONFIG": str(path)}).region == "us-east-2"
    with pytest.raises(CloudError, match="not found: copy flystage.toml.example"):
        load_settings(environ={"FLYSTAGE_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    "text, message",
    [
        ('regoin = "eu-west-1"\n', "unknown setting 'regoin'"),
        ('instance_count = "two"\n', "instance_count = 'two' is not a valid int"),
        ('spot = "maybe"\n', "spot = 'maybe' is not a valid bool"),
        ("region = [\n", "not valid TOML"),
        (
            "spot = true\nmax_runtime_s = 7200\nmax_wait_s = 3600\n",
            "max_wait_s .* must be >= max_runtime_s",
        ),
        ("instance_count = 0\n", "instance_count must be >= 1"),
    ],
)
def test_bad_files_name_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "flystage.toml"
    path.write_text(text)
    with pytest.raises(CloudError, match=message) as info:
        load_settings(path, environ={})
    if "must be" not in message:
        assert str(path) in str(info.value)


def test_require_says_how_to_set_each_missing_setting():
    with pytest.raises(CloudError) as info:
        Settings().require("role_arn", "bucket")
    text = str(info.value)
    assert "FLYSTAGE_ROLE_ARN" in text and "FLYSTAGE_BUCKET" in text and "execution role" in text
    with pytest.raises(CloudError, match="not an IAM role ARN"):
        Settings(role_arn="flystage-role").require("role_arn")
    Settings(role_arn="arn:aws:iam::000000000000:role/x").require("role_arn")


def test_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    from flystage.cloud.session import Api

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # No instance metadata or container credentials on a build machine either.
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    with pytest.raises(CloudError, match="no AWS credentials found: run `aws configure`"):
        Api(Settings(region="eu-west-1")).client("sagemaker")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(CloudError, match="no AWS region"):
        Api(Settings()).client("sagemaker")


def test_spot_option_gets_the_same_check_as_the_setting(tmp_path, monkeypatch, capsys):
    """`flystage cloud train --spot` (make train SPOT=1) with max_wait_s < max_runtime_s is
    refused before any request, as FLYSTAGE_SPOT=1 is."""
    from flystage import cli

    monkeypatch.chdir(tmp_path)
    for name, value in {
        "REGION": "eu-west-1",
        "BUCKET": "b",
        "ROLE_ARN": "arn:aws:iam::000000000000:role/x",
        "STATE_FILE": str(tmp_path / "s.json"),
        "MAX_RUNTIME_S": "7200",
        "MAX_WAIT_S": "3600",
    }.items():
        monkeypatch.setenv(f"FLYSTAGE_{name}", value)
    monkeypatch.delenv("FLYSTAGE_CONFIG", raising=False)
    monkeypatch.delenv("FLYSTAGE_SPOT", raising=False)
    assert cli.main(["cloud", "--dry-run", "train", "--spot", "--hp", "epochs=1"]) == 2
    captured = capsys.readouterr()
    assert (
        "max_wait_s (3600) must be >= max_runtime_s (7200)" in captured.err and captured.out == ""
    )
    assert (
        cli.main(["cloud", "--dry-run", "train", "--instance-count", "0", "--hp", "epochs=1"]) == 2
    )
