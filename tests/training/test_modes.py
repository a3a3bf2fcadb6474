"""Training modes through the real loop (``loop.fit``) on tiny synthetic embryos: full,
probe (frozen features cached per image and draw) and finetune (first stages frozen,
ImageNet BatchNorm statistics kept)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flystage.augment import AugmentConfig, build_train_transform
from flystage.channels import split_channels
from flystage.imaging import PreprocessConfig
from flystage.training.backbones import DEFAULT_TAPS, build_lite
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, StageDataset, to_float
from flystage.training.hog import HOGNet
from flystage.training.lite import LiteNet
from flystage.training.loop import fit, make_optimizer
from flystage.training.models import StageNet, build_feature_extractor, build_from_spec
from flystage.training.modes import setup_finetune
from flystage.training.probe import ProbeNet, cached_features
from train_helpers import LABELS, TINY_PREPROCESS, count_extracted, make_manifest_set
from train_helpers import tiny_config as tiny_train_config

torch.set_num_threads(1)
# Every augmented draw changes every image (the default probabilities can leave one untouched).
SURE_AUGMENT = AugmentConfig(p_intensity=1.0, p_rotation=1.0)


def tiny_config(**changes) -> TrainConfig:
    return tiny_train_config(
        **({"epochs": 2, "augment_draws": 2, "augment": SURE_AUGMENT} | changes)
    )


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    manifest = make_manifest_set(
        tmp_path_factory.mktemp("modes"), train_per_class=4, valid_per_class=2
    )
    train, valid, _ = split_channels(manifest)
    return train, valid


def valid_batch(valid, labels, cache: ImageCache) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = StageDataset(valid, labels, cache)
    return to_float(cache.get([r.path for r in valid])), torch.tensor(dataset.targets)


def quiet(line: str) -> None:
    pass


@pytest.mark.parametrize("arch, kind", [("small_cnn", StageNet), ("hognet", HOGNet)])
def test_full_mode_trains_every_weight(records, arch: str, kind: type) -> None:
    train, valid = records
    cache = ImageCache(PreprocessConfig(**TINY_PREPROCESS))
    result = fit(train, valid, tiny_config(arch=arch), log=quiet, image_cache=cache)
    assert isinstance(result.model, kind) and not result.model.training
    x, y = valid_batch(valid, result.labels, cache)
    with torch.no_grad():
        logits = result.model(x)
    assert logits.shape == (len(valid), len(LABELS))
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.spec == {"arch": arch, "mode": "full", "taps": list(DEFAULT_TAPS), "hog": False}
    again = build_from_spec(result.spec, len(LABELS), 1)
    again.load_state_dict(result.model.state_dict())  # strict: the spec rebuilds this architecture
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), logits)
    assert nn.functional.cross_entropy(logits, y).item() == pytest.approx(
        result.best["valid_loss"], rel=1e-4
    )


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "hognet"])
def test_probe_caches_features_per_image_and_draw_and_shares_them(
    records, monkeypatch, arch: str
) -> None:
    train, valid = records
    extracted = count_extracted(monkeypatch)
    cache = ImageCache(PreprocessConfig(**TINY_PREPROCESS))
    config = tiny_config(arch=arch, mode="probe")
    result = fit(train, valid, config, log=quiet, image_cache=cache)
    assert sum(extracted) == len(train) * (1 + config.augment_draws) + len(valid)

    # The model: frozen extractor, standardisation and the trained head, as one image model.
    model = result.model
    assert isinstance(model, ProbeNet) and not model.training
    assert not any(p.requires_grad for p in model.features.parameters())
    x, y = valid_batch(valid, result.labels, cache)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(valid), len(LABELS))
    # The head trained on cached features scores the images alike (the best epoch's loss).
    assert nn.functional.cross_entropy(logits, y).item() == pytest.approx(
        result.best["valid_loss"], rel=1e-4
    )
    if arch == "efficientnet_lite0":  # the backbone is ImageNet's, untouched
        reference = build_lite(arch).state_dict()
        # The default probe averages over the 180-degree turn: the backbone inside FlipAverage.
        lite = model.features.features
        for name, tensor in lite.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    pooling = {"flips": "turn", **({"columns": 3} if arch == "efficientnet_lite0" else {})}
    assert result.spec == {
        "arch": arch,
        "mode": "probe",
        "taps": list(DEFAULT_TAPS),
        "hog": False,
        **pooling,
    }

    # A second run on the same cache (another fold, another seed of the head) computes nothing.
    extracted.clear()
    fit(
        train,
        valid,
        tiny_config(arch=arch, mode="probe", epochs=1, learning_rate=0.01),
        log=quiet,
        image_cache=cache,
    )
    assert extracted == []
    # Other augmentation settings are other draws: computed anew.
    fit(
        train,
        valid,
        tiny_config(arch=arch, mode="probe", epochs=1, augment=AugmentConfig(p_blur=1.0)),
        log=quiet,
        image_cache=cache,
    )
    assert sum(extracted) == len(train) * (1 + config.augment_draws) + len(valid)

    # Augmented draws differ from the clean rows and from each other; valid images are clean only.
    (store,) = [
        s for key, s in cache.derived.items() if json.dumps(config.augment.to_dict()) in key[1]
    ]
    for record in train:
        rows = [store[(record.path, d)] for d in range(1 + config.augment_draws)]
        assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2])
    assert all((r.path, 1) not in store for r in valid)
    # Each draw is seeded by (seed, draw, path): a fresh cache computes the same rows.
    features, _ = build_feature_extractor(
        arch, 1, config.feature_taps, flips=config.probe_flips, columns=config.probe_columns
    )
    fresh = cached_features(
        features,
        "fresh",
        ImageCache(PreprocessConfig(**TINY_PREPROCESS)),
        [r.path for r in train],
        2,
        build_train_transform(config.augment, config.seed),
        config.seed,
    )
    torch.testing.assert_close(fresh, torch.stack([store[(r.path, 2)] for r in train]))


def test_finetune_freezes_the_first_stages_and_keeps_batchnorm_statistics(records) -> None:
    train, valid = records
    arch = "efficientnet_lite0"
    cache = ImageCache(PreprocessConfig(**TINY_PREPROCESS))
    config = tiny_config(
        arch=arch, mode="finetune", augment_draws=0, freeze_stages=2, learning_rate=0.01
    )
    result = fit(train, valid, config, log=quiet, image_cache=cache)
    model = result.model
    assert isinstance(model, LiteNet) and not model.training
    x, _ = valid_batch(valid, result.labels, cache)
    with torch.no_grad():
        assert model(x).shape == (len(valid), len(LABELS))

    net = model.net
    frozen = [net.conv_stem, net.bn1, net.blocks[0], net.blocks[1]]
    frozen_ids = {id(p) for module in frozen for p in module.parameters()}
    assert frozen_ids and all(not p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.requires_grad for p in net.parameters() if id(p) not in frozen_ids)

    reference = build_lite(arch)
    ref_params, ref_buffers = dict(reference.named_parameters()), dict(reference.named_buffers())
    changed = []
    for name, p in net.named_parameters():
        if name.startswith("classifier"):
            continue
        if id(p) in frozen_ids:
            assert torch.equal(p, ref_params[name]), name
        elif not torch.equal(p, ref_params[name]):
            changed.append(name)
    assert any(name.startswith("blocks.6") for name in changed)  # the unfrozen backbone did train
    batchnorms = [
        name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    assert len(batchnorms) > 40
    for name, buffer in net.named_buffers():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(buffer, ref_buffers[name]), f"{name} moved during training"
    assert result.spec["mode"] == "finetune"


def test_finetune_backbone_learns_at_its_scale_of_the_learning_rate(records) -> None:
    train, valid = records
    config = tiny_config(
        arch="efficientnet_lite0", mode="finetune", backbone_lr_scale=0.1, freeze_stages=3
    )
    cache = ImageCache(config.preprocess)
    setup = setup_finetune(train, valid, list(LABELS), cache, config, quiet)
    optimizer = make_optimizer(setup.param_groups, config)
    head = {id(p) for p in setup.model.net.classifier.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        expected = config.learning_rate * (1.0 if in_head == {True} else 0.1)
        assert group["lr"] == pytest.approx(expected)
        assert all(p.requires_grad for p in group["params"])
        assert group["weight_decay"] == (
            config.weight_decay if all(p.ndim > 1 for p in group["params"]) else 0.0
        )
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in setup.model.parameters() if p.requires_grad}
    assert not any(id(p) in optimised for p in setup.model.net.blocks[2].parameters())


def test_finetune_a_torchvision_backbone_from_the_hub_cache(records, tmp_path, monkeypatch) -> None:
    """Weights in the torch hub cache (as the train image bakes them in): the head and the
    later stages train, the stem and first stages stay as loaded."""
    from flystage.training.torchvision_nets import BUILDERS, weights_cache_path

    arch = "mobilenet_v3_small"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    reference = BUILDERS[arch](weights=None).state_dict()
    weights_cache_path(arch).parent.mkdir(parents=True)
    torch.save(reference, weights_cache_path(arch))
    train, valid = records
    cache = ImageCache(PreprocessConfig(**TINY_PREPROCESS))
    result = fit(
        train,
        valid,
        tiny_config(arch=arch, mode="finetune", epochs=1, freeze_stages=2),
        log=quiet,
        image_cache=cache,
    )
    x, _ = valid_batch(valid, result.labels, cache)
    with torch.no_grad():
        assert result.model(x).shape == (len(valid), len(LABELS))
    features = result.model.backbone.features
    assert all(not p.requires_grad for stage in features[:3] for p in stage.parameters())
    assert all(p.requires_grad for p in features[3].parameters())
    assert torch.equal(features[2].block[0][0].weight, reference["features.2.block.0.0.weight"])
    assert not torch.equal(
        features[-1][0].weight, reference[f"features.{len(features) - 1}.0.weight"]
    )
    # BatchNorm keeps the loaded statistics there too (batches this small cannot re-estimate them).
    for name, buffer in result.model.backbone.named_buffers():
        if "running" in name:
            assert torch.equal(buffer, reference[name]), f"{name} moved during fine-tuning"


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {},
        {"probe_solver": "sgd"},
        {"mode": "finetune"},
        {"mode": "full"},
        {"arch": "small_cnn"},
        {"arch": "hognet"},
        {"arch": "hognet", "mode": "probe"},
        {"arch": "resnet18"},
        {"arch": "resnet18", "pretrained": "true"},
        {"arch": "efficientnet_lite0", "mode": "probe", "probe_solver": "lbfgs"},
        {"ensemble_archs": "efficientnet_lite0,efficientnet_lite1"},
        {"ensemble_archs": "efficientnet_lite0,small_cnn"},
    ],
)
def test_the_tuner_resolves_the_mode_as_the_training_program(hyperparameters) -> None:
    """The tuner (torch-free, flystage.training.kinds) must search for the mode the job trains:
    parse the same hyperparameters as the training program does and compare."""
    from flystage.options import ArgumentParser
    from flystage.training import kinds
    from flystage.training.config import config_from_args
    from flystage.training.train import configure_parser

    parser = ArgumentParser()
    configure_parser(parser)
    argv = [f"--{k}={v}" for k, v in hyperparameters.items()]
    config = config_from_args(parser.parse_args(argv))
    exact = config.probe_solver == "lbfgs" and all(
        config.mode_of(a) == "probe" for a in config.member_archs
    )
    assert kinds.training_kind(hyperparameters) == (kinds.EXACT_PROBE if exact else kinds.GRADIENT)
