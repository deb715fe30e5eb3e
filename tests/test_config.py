"""Precision selection and the example runner's argument handling."""

import pytest

from hf_align import DPOConfig, IPOConfig
from hf_align.scripts import ScriptArguments, plot_metrics


def test_auto_precision_is_fp32_on_cpu(tmp_path):
    config = DPOConfig(output_dir=str(tmp_path))
    assert config.precision == "fp32" and not config.bf16 and not config.fp16


def test_bf16_on_cpu_falls_back_to_fp32_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="fp32"):
        config = DPOConfig(output_dir=str(tmp_path), bf16=True)
    assert not config.bf16 and config.precision == "fp32"


def test_unknown_precision_and_loss_type_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        DPOConfig(output_dir=str(tmp_path), precision="int3")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(output_dir=str(tmp_path), loss_type="sigmoidd")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(output_dir=str(tmp_path), loss_type="robust", label_smoothing=0.5)


def test_ipo_config_defaults(tmp_path):
    config = IPOConfig(output_dir=str(tmp_path))
    assert config.loss_type == ["ipo"] and config.beta == 0.5


def test_embedded_defaults_apply_only_to_the_default_model(monkeypatch, tmp_path):
    """The example runner's large learning rate is for the random tiny model, never for a Hub model."""
    from transformers import HfArgumentParser

    from hf_align import scripts

    captured = {}

    class Recorder:
        config_class = DPOConfig
        algorithm = "DPO"

        def __init__(self, model, args, **kwargs):
            captured["model"], captured["args"] = model, args
            raise SystemExit  # stop before training

    monkeypatch.setattr(scripts, "load_data", lambda *a: (None, None))
    embedded = {"learning_rate": 5e-4, "num_train_epochs": 2}
    with pytest.raises(SystemExit):
        scripts.run(Recorder, "preference", embedded, ["--output_dir", str(tmp_path)])
    assert captured["args"].learning_rate == 5e-4 and captured["args"].num_train_epochs == 2
    with pytest.raises(SystemExit):
        scripts.run(Recorder, "preference", embedded, ["--output_dir", str(tmp_path), "--learning_rate", "1e-3"])
    assert captured["args"].learning_rate == 1e-3
    with pytest.raises(SystemExit):
        scripts.run(Recorder, "preference", embedded, ["--output_dir", str(tmp_path), "--model_name_or_path", "org/m"])
    assert captured["model"] == "org/m" and captured["args"].learning_rate == 1e-6
    assert HfArgumentParser((ScriptArguments, DPOConfig))  # both dataclasses parse together


def test_plot_metrics_writes_png(tmp_path):
    history = [{"step": s, "loss": 1 / s, "rewards/margins": s / 10} for s in range(1, 6)]
    path = plot_metrics(history, str(tmp_path / "m.png"))
    assert path and (tmp_path / "m.png").stat().st_size > 1000
    assert plot_metrics([{"step": 1, "epoch": 1}], str(tmp_path / "none.png")) is None
