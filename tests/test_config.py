"""config.load_config blames each error where the mistake is: an override on the `--set` that holds it, a key of the
YAML on the YAML file. A typo on the command line otherwise sends the user looking for it in a file that does not
hold it."""

from __future__ import annotations

import pytest
import yaml

from config import ConfigError, load_config


@pytest.fixture
def fine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 3}, "model": {"kind": "foveated"}}))
    return path


def error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize(
    ("overrides", "wanted"),
    [
        (["train.max_step=3"], "--set train.max_step=3: unknown config key 'train.max_step' (did you mean "
                               "'train.max_steps'?)"),
        (["trian.seed=1"], "--set trian.seed=1: unknown config key 'trian' (did you mean 'train'?)"),
        (["model.deep_querys=false"], "--set model.deep_querys=false: unknown config key 'model.deep_querys' "
                                      "(model.kind foveated) (did you mean 'model.deep_query'?)"),
        (["model.kind=mlp", "model.deep_query=false"], "--set model.deep_query=false: unknown config key "
                                                       "'model.deep_query' (model.kind mlp) (valid keys: "),
        (["model.lora={r: 4, alpha: 8, dropot: 0.1}"], "--set model.lora={r: 4, alpha: 8, dropot: 0.1}: unknown "
                                                       "config key 'model.lora.dropot'"),
        (["train.max_steps=many"], "--set train.max_steps=many: 'train.max_steps' must be int, got 'many'"),
        (["train.max_steps=0"], "--set train.max_steps=0: 'train.max_steps' must be >= 1, got 0"),
        (["model.lora.r=0"], "--set model.lora.r=0: 'model.lora.r' must be >= 1, got 0"),
        (["train.seed=1", "train.val_every=5"], "--set train.val_every=5: 'train.val_every' > 0 needs 'data.val'"),
        (["train=3"], "--set train=3: 'train' must be a mapping, got 3"),
        (["train.max_steps.x=1"], "--set train.max_steps.x=1: 'train.max_steps' is not a section"),
        (["train.max_steps"], "--set train.max_steps: must look like key.sub=value"),
        (["train..max_steps=1"], "--set train..max_steps=1: the key must be names joined by dots"),
        (["train.max_steps=[1"], "--set train.max_steps=[1: the value is not valid YAML"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)  # fmt: skip
def test_a_bad_override_is_blamed_on_its_set(fine, overrides, wanted):
    message = error(fine, *overrides)
    assert message.startswith(wanted), message
    assert str(fine) not in message  # the YAML holds no mistake


def test_a_bad_key_in_the_yaml_is_blamed_on_the_yaml_whatever_is_set(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_step": 3}}))
    message = error(path, "train.seed=1", "train.max_steps=2")
    assert message == f"{path}: unknown config key 'train.max_step'; did you mean 'max_steps'?"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 0}}))
    assert error(path, "train.seed=1") == f"{path}: 'train.max_steps' must be >= 1, got 0"


def test_overrides_that_are_fine_still_load(fine):
    cfg = load_config(fine, ["model.lora.r=4", "optim.lr_connector=1e-2", "data.train=x-{0..3}.tar"])
    assert cfg.model.lora.r == 4 and cfg.optim.lr_connector == 1e-2 and cfg.data.train[0].path == "x-{0..3}.tar"
    assert load_config(None, ["model.kind=mlp", "model.image_prep=letterbox"]).model.image_prep == "letterbox"
    assert error(None, "train.keep_best=1").startswith("--set train.keep_best=1: 'train.keep_best' by val_loss")
