"""Config composition for every pair x distiller x data set (compose API, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rld.config import register_configs, run_name
from rld.distillers import DISTILLERS as REGISTRY
from rld.errors import ConfigError
from rld.validate import validate

CONF = Path(__file__).resolve().parent.parent / "conf"
register_configs()

PAIRS = sorted(p.stem for p in (CONF / "pair").glob("*.yaml"))
IMAGENET_PAIRS = ["resnet34_resnet18", "resnet50_mobilenetv1"]
CIFAR_PAIRS = [p for p in PAIRS if p not in IMAGENET_PAIRS]
DISTILLERS = ["vanilla", "kd", "dkd", "rld", "fitnet", "ofd", "reviewkd", "crd"]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(*overrides: str, hydra: bool = False):
    return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_every_pair_of_the_paper_has_a_file():
    import csv
    import io
    from importlib.resources import files

    text = files("rld").joinpath("data/paper_results.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 18
    for row in rows:
        assert f"{row['teacher']}_{row['student']}".lower() in PAIRS
    assert len(CIFAR_PAIRS) == 17 and "tiny" in CIFAR_PAIRS


@pytest.mark.parametrize("distiller", DISTILLERS)
def test_cifar_family_compositions(distiller):
    cases = [("cifar100", p) for p in CIFAR_PAIRS]
    cases += [(d, p) for d in ("synthetic", "digits") for p in ("tiny", "vgg13_mobilenetv2")]
    for dataset, pair in cases:
        cfg = _compose(f"dataset={dataset}", f"pair={pair}", f"distiller={distiller}")
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert cfg.distiller.name == distiller
        student = cfg.pair.student.lower()
        assert cfg.optim.lr == (0.01 if student.startswith(("shuffle", "mobilenet")) else 0.05)


@pytest.mark.parametrize("distiller", DISTILLERS)
def test_imagenet_compositions(distiller):
    for pair in IMAGENET_PAIRS:
        cfg = _compose("dataset=imagenet", f"pair={pair}", f"distiller={distiller}")
        validate(cfg)
        assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.optim.lr) == (512, 100, 0.2)
        assert list(cfg.optim.milestones) == [30, 60, 90] and cfg.optim.weight_decay == 1e-4
        if distiller in ("dkd", "rld"):
            assert (cfg.distiller.tau, cfg.distiller.warmup) == (1.0, 1)
            assert cfg.distiller.beta == (0.5 if pair == "resnet34_resnet18" else 2.0)


def test_cifar_recipe_and_official_defaults():
    cfg = _compose()
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (64, 240)
    assert list(cfg.optim.milestones) == [150, 180, 210]
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5e-4)
    rld = cfg.distiller
    assert (rld.alpha, rld.beta, rld.tau, rld.scd_tau, rld.warmup, rld.ce_weight) == (
        1.0, 8.0, 4.0, 4.0, 20, 1.0)
    kd = _compose("distiller=kd").distiller
    assert (kd.tau, kd.ce_weight, kd.kd_weight) == (4.0, 0.1, 0.9)
    assert _compose("distiller=rld", "distiller.tau=3").distiller.scd_tau == 3.0
    dkd_beta = {p: _compose(f"pair={p}", "distiller=dkd").distiller.beta for p in CIFAR_PAIRS}
    assert dkd_beta["resnet56_resnet20"] == dkd_beta["resnet110_resnet20"] == 2.0
    assert dkd_beta["vgg13_vgg8"] == dkd_beta["wrn_40_2_wrn_40_1"] == 6.0
    assert dkd_beta["resnet32x4_resnet8x4"] == dkd_beta["resnet50_mobilenetv2"] == 8.0
    assert dkd_beta["wrn_40_2_shufflev1"] == 8.0  # mdistiller's wrn40_2_shuv1.yaml sets none


def test_teacher_checkpoint_default_follows_the_published_layout():
    cfg = _compose("pair=vgg13_vgg8")
    assert cfg.teacher.checkpoint == "./teachers/cifar100/vgg13_vanilla/ckpt_epoch_240.pth"
    digits = _compose("dataset=digits", "pair=tiny", "paths.root=/x")
    assert digits.teacher.checkpoint == "/x/teachers/digits/resnet14_vanilla/teacher.pth"


def test_run_directory_names_the_point():
    cfg = _compose("dataset=synthetic", "pair=tiny", "distiller.beta=2", "trainer.epochs=3",
                   "paths.root=R", hydra=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.run.dir == "R/sweeps/main/synthetic/tiny/rld/beta=2+tau=4+trainer.epochs=3/seed=0"
    assert run_name("teacher", {"name": "vanilla"}, ["role=teacher"]) == "teacher/default"
    assert run_name("student", {"name": "kd", "tau": 2.5}, ["distiller.tau=2.5"]) == "kd/tau=2.5"
    assert run_name("student", {"name": "rld", "beta": 0.5, "tau": 1.0},
                    ["dataset.root=/a/b", "distiller.alpha=2"]) == "rld/beta=0.5+tau=1+alpha=2"
    # the point keys are the registered distiller's, whatever they are
    assert run_name("student", {"name": "fitnet", "hint_layer": 3},
                    ["distiller.hint_layer=3"]) == "fitnet/hint_layer=3"


def test_sweep_presets_cover_the_paper_grids():
    for preset, beta, tau in (("cifar_grid", "2,4,8,16", "2,3,4,5"),
                              ("imagenet_grid", "0.5,1,2,3", "1,2")):
        cfg = _compose(f"sweep={preset}", hydra=True)
        assert cfg.hydra.mode.name == "MULTIRUN"
        assert cfg.hydra.sweeper.params["distiller.beta"] == beta
        assert cfg.hydra.sweeper.params["distiller.tau"] == tau


@pytest.mark.parametrize("override, key", [
    ("distiller.tau=0", "distiller.tau"), ("distiller.scd_tau=-1", "distiller.scd_tau"),
    ("distiller.alpha=-1", "distiller.alpha"), ("distiller.beta=-2", "distiller.beta"),
    ("distiller.warmup=-1", "distiller.warmup"), ("optim.lr=-0.1", "optim.lr"),
    ("trainer.epochs=0", "trainer.epochs"), ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"), ("role=coach", "role"),
    ("pair.student=resnet9", "pair.student"), ("trainer.device=tpu", "trainer.device"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose(override))


def test_teacher_role_requires_vanilla():
    with pytest.raises(ConfigError, match="distiller=vanilla"):
        validate(_compose("role=teacher", "distiller=rld"))


def test_every_registered_distiller_has_a_config_file_and_back():
    files = sorted(p.stem for p in (CONF / "distiller").glob("*.yaml"))
    assert files == sorted(REGISTRY.names())


def test_registering_the_schemas_again_stores_each_once(monkeypatch):
    """`register_configs` runs at import and again after the plugins are loaded: the second
    call leaves Hydra's store as it was, with no warning (Hydra 1.4 warns on a name stored
    again, on every sweeper's and run's stderr; Hydra 1.5 refuses it); a distiller
    registered anew under its name gets its new schema, silently too."""
    import dataclasses
    import warnings

    from hydra.core.config_store import ConfigStore

    schemas = ConfigStore.instance().repo["distiller_schema"]
    before = dict(schemas)
    kd = REGISTRY.get("kd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_configs()
        assert all(schemas[name] is node for name, node in before.items())
        monkeypatch.setitem(REGISTRY._entries, "kd", dataclasses.replace(
            kd, defaults={**kd.defaults, "tau": 7.0}))
        try:
            register_configs()
            assert schemas["kd.yaml"] is not before["kd.yaml"]
            assert "7.0" in str(schemas["kd.yaml"].node.tau)
            assert all(schemas[n] is before[n] for n in before if n != "kd.yaml")
        finally:
            monkeypatch.undo()
            register_configs()
    assert _compose("distiller=kd").distiller.tau == kd.settings().tau


def test_a_distillers_keys_are_its_settings_alone():
    """Each distiller's node holds its registered settings (typed, with their defaults)
    and no other: a key of another distiller is refused at composition, a typo too, and
    one added with `+` by the validation, with the closest settings named."""
    kd = _compose("distiller=kd").distiller
    assert sorted(kd) == sorted(["name", *REGISTRY.get("kd").setting_names()])
    with pytest.raises(Exception, match="beta"):
        _compose("distiller=kd", "distiller.beta=2")
    with pytest.raises(Exception, match="bta"):
        _compose("distiller.bta=2")
    with pytest.raises(ConfigError) as e:
        validate(_compose("+distiller.bta=2"))
    assert str(e.value).startswith("distiller.bta is not a setting of rld (did you mean "
                                   "distiller.beta")
    assert "its settings: warmup, ce_weight, kd_weight, alpha, beta" in str(e.value)
    with pytest.raises(Exception, match="abc"):
        _compose("distiller.beta=abc")


def test_unknown_top_level_and_nested_keys_are_refused_with_the_closest():
    with pytest.raises(ConfigError, match=r"sed is not a key.*did you mean seed"):
        validate(_compose("+sed=1"))
    with pytest.raises(ConfigError, match=r"trainer.epoch is not a key.*trainer.epochs"):
        validate(_compose("+trainer.epoch=1"))
    validate(_compose("+pair.loss_defaults.rld.beta=3"))  # dict-typed nodes are open


def test_an_unregistered_distiller_or_dataset_is_one_line_with_the_registered_names():
    cfg = _compose()
    cfg.distiller.name = "rlx"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith("distiller='rlx' is not a registered distiller (did you "
                                   "mean rld?); use one of")
    cfg = _compose()
    cfg.dataset.name = "cifar10"
    with pytest.raises(ValueError, match=r"dataset='cifar10' is not a registered data set"):
        validate(cfg)
