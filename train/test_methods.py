"""The method registry, the options derived from TrainConfig, and the renamed config keys."""

import argparse
from dataclasses import fields

import pytest

from plateau.train import Method, TrainConfig, add_arguments, get_method, list_methods, register_method
from plateau.train import methods as registry


def test_builtin_methods_and_what_they_perturb():
    assert list_methods() == ["none", "gaussian", "quantnoise", "sam", "sam-gaussian", "ramp",
                              "alternate", "lsq", "fpq", "cr", "mec", "ti"]  # last five: QAT (test_qat.py)
    flat = [n for n in list_methods() if not get_method(n).qat]
    table = {n: (m.noise, m.noise_fraction, m.sam) for n in flat for m in [get_method(n)]}
    assert table == {"none": (False, False, False), "gaussian": (True, False, False),
                     "quantnoise": (True, True, False), "sam": (False, False, True),
                     "sam-gaussian": (True, False, True), "ramp": (True, False, False),
                     "alternate": (True, False, False)}
    assert get_method("ramp").noise_scale(0, 10) == 0.0 and get_method("ramp").noise_scale(9, 10) == 1.0
    assert [get_method("alternate").noise_scale(s, 10) for s in range(4)] == [1.0, 0.0, 1.0, 0.0]
    assert get_method("gaussian").noise_scale(3, 10) == 1.0
    assert get_method("sam").report_fields == {"rho": "rho"}
    assert get_method("quantnoise").report_fields == {"p": "noise_p"}
    with pytest.raises(ValueError, match="method must be one of none, gaussian, .*got 'dropout'"):
        get_method("dropout")


def test_noise_fraction_only_for_methods_that_ask():
    assert TrainConfig(method="quantnoise", noise_p=0.3).noise_config().p == 0.3
    assert TrainConfig(method="gaussian", noise_p=0.3).noise_config().p == 1.0


def test_register_method_is_all_a_new_method_takes(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the real table as it was

    @register_method
    class Half(Method):
        name = "half-noise"
        summary = "Gaussian noise at half alpha"
        noise = True

        def noise_scale(self, step: int, total: int) -> float:
            return 0.5

    assert "half-noise" in list_methods() and TrainConfig(method="half-noise").training_method.noise
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--method", "half-noise"]).method == "half-noise"  # choices come from the registry
    with pytest.raises(ValueError, match="new, non-empty name"):
        register_method(Half)


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_options_derived_from_config_fields_with_old_names_kept():
    a = _parse()
    d = TrainConfig()
    for f in fields(TrainConfig):
        if f.name not in ("lr", "warmup_epochs", "method"):  # resolved by main(): --checkpoint, --optimizer, --qat
            assert getattr(a, f.name) == getattr(d, f.name), f.name
    assert a.lr is None and a.warmup_epochs is None and a.method is None and a.progress is True
    old = _parse("--noise", "sam", "--first-last-8bit", "--no-progress", "--epochs", "3")
    new = _parse("--method", "sam", "--keep-first-last-8bit", "--no-progress", "--epochs", "3")
    assert vars(old) == vars(new)
    assert (new.method, new.keep_first_last_8bit, new.progress, new.epochs) == ("sam", True, False, 3)
    with pytest.raises(SystemExit):
        _parse("--noise", "dropout")


def test_config_from_old_keys():
    old = {**TrainConfig().to_dict(), "noise": "ramp", "first_last_8bit": True}
    del old["method"], old["keep_first_last_8bit"]
    cfg = TrainConfig.from_dict({**old, "unknown_key": 1})
    assert cfg.method == "ramp" and cfg.keep_first_last_8bit
    both = {**TrainConfig(method="sam").to_dict(), "noise": "ramp"}  # the new name wins over the old
    assert TrainConfig.from_dict(both).method == "sam"


def test_bad_choice_names_the_valid_ones():
    with pytest.raises(ValueError, match="flatness must be one of epoch, end, off"):
        TrainConfig(flatness="always")
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        TrainConfig(optimizer="lion")
