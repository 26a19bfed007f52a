"""Which settings a resume must keep: every one that changes a weight's shape (found from the weights,
not from a list) and the declared ones that change what the same weights compute."""
import dataclasses

import pytest

from config import PRESETS, RESUME_SAME_FIELDS, Config, ConfigError
from tests.util import RECORD46_TINY, SMALL, config_error
from training.checkpoint import check_resumable, parameter_shapes

# record #46's layout (the old cpu-tiny) at a small width: its fields change shapes one by one
BASE = dataclasses.replace(Config(**RECORD46_TINY), model_dim=64, num_heads=2, vocab_size=512, bos_token=0)
# A different valid value for each field a flip can try; fields not here are flipped by type.
OTHER_VALUES = dict(attention_free_layers="0", mlp_free_layers="", long_window_layers="3",
                    value_embed_layers="1:0,2:1", unet_skips="all", backout_layer="", x0_mix_init="1,0.5",
                    softcap="tanh", optimizer="muon", muon_orthogonalizer="newton_schulz", adam_every=1,
                    hidden_init="torch", loss_reduction="mean", num_heads=4, num_layers=9, gate_dims=6,
                    vocab_size=640, model_dim=128)


def flipped(field):
    """BASE with `field` set to another value that still builds a model, or None."""
    value = getattr(BASE, field.name)
    if field.name in OTHER_VALUES:
        new = OTHER_VALUES[field.name]
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1
    else:
        return None
    config = dataclasses.replace(BASE, **{field.name: new})
    try:
        parameter_shapes(config)
    except ConfigError:
        return None
    return config


def saved_state(config):
    return {"config": dataclasses.asdict(config), "model": _meta_state(config)}


def _meta_state(config):
    import torch

    from config import make_plan
    from model.gpt import GPT

    with torch.device("meta"):
        return GPT(make_plan(config)).state_dict()


def test_every_setting_that_changes_a_weight_refuses_the_resume_naming_it():
    state, base_shapes = saved_state(BASE), parameter_shapes(BASE)
    shape_changing = []
    for field in dataclasses.fields(Config):
        config = flipped(field)
        if config is None or parameter_shapes(config) == base_shapes:
            continue
        shape_changing.append(field.name)
        with pytest.raises(ConfigError, match=rf"different model configuration \(.*{field.name} "):
            check_resumable(state, "ckpt.pt", config)
    # the flips reached the layout, the sizes and the gates, merged_qkvo among them
    assert {"merged_qkvo", "num_layers", "model_dim", "vocab_size", "attn_gate", "smear_gate", "value_residual",
            "gate_dims", "value_embed_layers", "attention_free_layers", "mlp_free_layers", "unet_skips",
            "backout_layer"} <= set(shape_changing)


def test_declared_settings_refuse_the_resume_and_others_may_change():
    state = saved_state(BASE)
    for name in RESUME_SAME_FIELDS:
        config = flipped(next(f for f in dataclasses.fields(Config) if f.name == name))
        if config is not None:
            with pytest.raises(ConfigError, match=name):
                check_resumable(state, "ckpt.pt", config)
    # a longer run at another learning rate continues the same model
    check_resumable(state, "ckpt.pt", dataclasses.replace(BASE, steps=200, muon_lr=0.01, val_every=5))


@pytest.mark.slow
def test_a_resume_that_changes_a_weights_shape_is_one_line_naming_it(compact_files, one_process_checkpoint, tmp_path):
    line = config_error(SMALL + compact_files + ["--bigram-rows", "1000", "--resume", one_process_checkpoint], tmp_path)
    assert "has a different model configuration (bigram_rows 62880 -> 1000; weights: " in line
    assert "resume with the settings it was saved with" in line
