"""ESD clients' `config_params`, in both the forms they send, become one TrainingConfig; a bad
value is refused as an `Invalid` that names the argument, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.contracts.kohya import InvalidTrainingConfig, TrainingConfig
from shared.errors import Invalid


def test_defaults_when_nothing_is_given():
    config = TrainingConfig.from_esd({})
    assert config.output_name == "lora"
    assert config.max_train_epochs == 1 and config.max_train_steps is None
    assert config.learning_rate == 1e-4 and config.unet_learning_rate == 1e-4
    assert config.network_dim == 8 and config.alpha == 8  # alpha follows the dim: a LoRA scale of 1
    assert config.resolution == (512, 512)
    assert config.train_batch_size == 1 and config.gradient_accumulation_steps == 1
    assert config.optimizer_type == "AdamW" and config.lr_scheduler == "constant"
    assert config.save_every_n_epochs is None and config.seed is None
    assert config.fm_type == "sd_1_5" and config.mixed_precision == "no"
    assert not config.train_text_encoder and config.caption_extension == ".txt"
    assert TrainingConfig.from_esd(None) == config


def test_flat_form_under_training():
    training = {"output_name": "x", "max_train_epochs": 2, "optimizer_type": "AdamW8bit", "save_every_n_epochs": 1}
    config = TrainingConfig.from_esd({"training": training})
    assert (config.output_name, config.max_train_epochs, config.optimizer_type, config.save_every_n_epochs) == (
        "x",
        2,
        "AdamW8bit",
        1,
    )


def test_grouped_form_as_kohya_gui_exports_it():
    config = TrainingConfig.from_esd(
        {
            "saving_arguments": {"output_name": "technic", "save_every_n_epochs": "2", "save_precision": "fp16"},
            "training_arguments": {
                "max_train_epochs": "10",
                "max_train_steps": "",  # the GUI's "not set"
                "learning_rate": "0.0001",
                "train_batch_size": 2,
                "seed": "",
                "mixed_precision": "fp16",
            },
            "additional_network_arguments": {"network_dim": 32, "network_alpha": 16, "unet_lr": 0},
            "optimizer_arguments": {"optimizer_type": "adamw8bit", "lr_scheduler": "cosine"},
            "dataset_arguments": {"resolution": "768,512"},
            "model_arguments": {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"},
        }
    )
    assert config.output_name == "technic" and config.save_every_n_epochs == 2
    assert config.max_train_epochs == 10 and config.max_train_steps is None
    assert config.learning_rate == 1e-4 and config.unet_learning_rate == 1e-4  # unet_lr 0: not set
    assert config.train_batch_size == 2 and config.seed is None
    assert config.network_dim == 32 and config.alpha == 16
    assert config.optimizer_type == "AdamW8bit" and config.lr_scheduler == "cosine"
    assert config.resolution == (768, 512)
    assert config.save_precision == "fp16" and config.mixed_precision == "fp16"


def test_gui_names_and_top_level_keys():
    config = TrainingConfig.from_esd(
        {
            "training": {"epoch": 3, "optimizer": "AdamW", "max_resolution": "512,512", "network_dim": 4},
            "network_dim": 16,  # top-level keys win over sections
            "fm_type": "sd_xl",
            "network_train_unet_only": False,  # kohya trains the text encoder unless told not to
        }
    )
    assert config.max_train_epochs == 3 and config.resolution == (512, 512)
    assert config.network_dim == 16 and config.fm_type == "sd_xl" and config.train_text_encoder


def test_overrides_win_over_config_params():
    config = TrainingConfig.from_esd({"training": {"fm_type": "sd_xl"}}, fm_type="sd_1_5")
    assert config.fm_type == "sd_1_5"


def test_steps_decide_alone_but_epochs_win_when_both_are_given():
    assert TrainingConfig.from_esd({"max_train_steps": 50}).max_train_steps == 50
    both = TrainingConfig.from_esd({"max_train_steps": 50, "max_train_epochs": 2})
    assert both.max_train_steps is None and both.max_train_epochs == 2


@pytest.mark.parametrize("resolution", [512, "512", "512,512", "512x512", [512, 512], "(512, 512)"])
def test_resolution_forms(resolution):
    assert TrainingConfig.from_esd({"resolution": resolution}).resolution == (512, 512)


def test_negative_seed_means_random():
    assert TrainingConfig.from_esd({"seed": -1}).seed is None
    assert TrainingConfig.from_esd({"seed": "42"}).seed == 42


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"training": {"learning_rate": -1}}, "learning_rate"),
        ({"training": {"max_train_epochs": "two"}}, "max_train_epochs"),
        ({"additional_network_arguments": {"network_dim": 0}}, "network_dim"),
        ({"resolution": "huge"}, "resolution"),
        ({"resolution": "500,500"}, "resolution"),
        ({"optimizer_type": "Lion"}, "optimizer_type"),
        ({"output_name": "../escape"}, "output_name"),
        ({"fm_type": "sd_3"}, "fm_type"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
    ],
)
def test_bad_values_are_refused_naming_the_field(params, field):
    with pytest.raises(InvalidTrainingConfig, match=rf"^{field}: ") as caught:
        TrainingConfig.from_esd(params)
    assert isinstance(caught.value, Invalid) and not isinstance(caught.value, ValueError)
    assert caught.value.message.startswith(f"{field}: ") and caught.value.status == 400
    assert "\n" not in caught.value.message


def test_optimizer_message_lists_what_is_supported():
    with pytest.raises(InvalidTrainingConfig, match="'Lion' is not supported; use one of AdamW, AdamW8bit"):
        TrainingConfig.from_esd({"optimizer_type": "Lion"})


def test_config_params_must_be_an_object():
    with pytest.raises(InvalidTrainingConfig, match="config_params must be an object"):
        TrainingConfig.from_esd(["learning_rate", 1])  # type: ignore[arg-type]


def test_the_contract_needs_no_torch():
    check = (
        "import sys; from shared.contracts.kohya import TrainingConfig; "
        "TrainingConfig.from_esd({'learning_rate': 0.001}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", check], cwd=root, check=True, timeout=60)


def test_a_training_that_does_not_name_its_lora_gets_a_name_of_its_own():
    from services.training.trainings import Trainings
    from shared.contracts.identity import Principal
    from shared.contracts.training import CreateTraining

    def command(config_params: dict) -> CreateTraining:
        return CreateTraining.model_validate(
            {
                "actor": Principal(username="u", roles=[], permissions=[]),
                "params": {"training_params": {"model": "m", "dataset": "d"}, "config_params": config_params},
            }
        )

    unnamed = Trainings._named(command({"training": {"max_train_epochs": 2}}), "0123abcd-ffff")
    assert unnamed.params.config_params == {"training": {"max_train_epochs": 2}, "output_name": "lora-0123abcd"}
    assert TrainingConfig.from_esd(unnamed.params.config_params).output_name == "lora-0123abcd"
    for named in ({"training": {"output_name": "cats"}}, {"saving_arguments": {"output_name": "cats"}}):
        assert Trainings._named(command(named), "0123abcd-ffff").params.config_params == named
