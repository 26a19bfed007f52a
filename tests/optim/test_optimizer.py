"""The one optimizer object: every parameter has a role, and one without is refused by name."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from config import PRESETS, Config, ConfigError, make_plan
from model.gpt import GPT
from optim.optimizer import ROLES, Optimizer, parameter_roles


def small(preset):
    """A preset at a small width and vocabulary: the layout and optimizer choices are the preset's."""
    return dataclasses.replace(Config(**PRESETS[preset]), model_dim=64, num_heads=2, vocab_size=512, bos_token=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_parameter_of_every_preset_is_trained_by_exactly_one_optimizer_group(preset):
    config = small(preset)
    model = GPT(make_plan(config))
    optimizer = Optimizer(model, make_plan(config))
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none left out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_new_parameter_outside_the_blocks_is_refused_by_name(preset):
    config = small(preset)
    model = GPT(make_plan(config))
    model.new_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ConfigError, match=r"no optimizer role covers parameter\(s\) new_scale \(3,\)"):
        Optimizer(model, make_plan(config))


def test_a_new_block_matrix_and_scalar_take_the_blocks_roles():
    config = small("speedrun")
    model = GPT(make_plan(config))
    block = next(b for b in model.blocks if b is not None)
    block.new_matrix, block.new_scalar = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(()))
    roles = parameter_roles(model)
    assert any(p is block.new_matrix for p in roles["hidden"]) and any(p is block.new_scalar for p in roles["scalars"])


def test_no_two_roles_cover_one_parameter_of_any_preset():
    for preset in PRESETS:
        for name, p in GPT(make_plan(small(preset))).named_parameters():
            assert len([r for r in ROLES if r.covers(name, p)]) == 1, (preset, name)


def test_the_scalars_keep_the_order_checkpoints_were_written_in():
    # Optimizer state is matched to parameters by position: the blocks' scalars, then the U-net
    # skip, smear and backout scalars, as every checkpoint so far holds them.
    model = GPT(make_plan(small("record46")))
    names = {id(p): n for n, p in model.named_parameters()}
    scalars = [names[id(p)] for p in parameter_roles(model)["scalars"]]
    assert scalars[-3:] == ["skip_weights", "smear_lambda", "backout_lambda"]
    assert all(n.startswith("blocks.") for n in scalars[:-3])


def _is_gate_name(name):
    return name == "smear_gate.weight" or name.endswith(".attn.gate.weight")


def test_record46s_parameters_train_in_the_groups_they_always_had():
    """Record #46 (docs/RECORD46.md 4.1-4.2) as this project has grouped it: DistAdam's groups embed, value embeddings,
    head, scalars (the blocks' then skip, smear, backout) at their fields' LRs with #46's betas and no decay; NorMuon's
    one group, the block matrices in the model's order and then the gates, at --muon-lr alone. HEAD's roles change
    none of it."""
    config = small("record46")
    model = GPT(make_plan(config))
    opt = Optimizer(model, make_plan(config))
    names = {id(p): n for n, p in model.named_parameters()}
    named = list(model.named_parameters())
    scalars = [n for n, p in named if n.startswith("blocks.") and p.ndim < 2] + ["skip_weights", "smear_lambda",
                                                                                  "backout_lambda"]
    got = [(g["role"], g["lr"], g["betas"], g["weight_decay"], g["cautious_decay"], [names[id(p)] for p in g["params"]])
           for g in opt.adam.param_groups]
    assert got == [("embed", 0.6, (0.65, 0.95), 0.0, 0.0, ["embed.weight"]),
                   ("value_embeds", 0.6, (0.65, 0.95), 0.0, 0.0, [f"value_embeds.{k}.weight" for k in range(3)]),
                   ("head", 0.008, (0.65, 0.95), 0.0, 0.0, ["lm_head.weight"]),
                   ("scalars", 0.04, (0.65, 0.95), 0.0, 0.0, scalars)]
    matrices = ([n for n, p in named if n.startswith("blocks.") and p.ndim >= 2 and not _is_gate_name(n)]
                + [n for n, _ in named if _is_gate_name(n)])
    [group] = opt.muon.param_groups
    assert [names[id(p)] for p in group["params"]] == matrices
    assert (group["lr"], group["lr_mul"], group["row_blocks"], group["square_stat"]) == (0.023, 1.0, None, "column")
    assert not opt.tied and opt.state_dict()["embed_tied"] is False


def test_under_adamw_the_block_matrices_stay_one_decayed_group_in_the_models_order():
    config = dataclasses.replace(small("record11"), optimizer="adamw", weight_decay=0.1)
    model = GPT(make_plan(config))
    opt = Optimizer(model, make_plan(config))
    names = {id(p): n for n, p in model.named_parameters()}
    [adamw] = opt.parts
    assert [g["role"] for g in adamw.param_groups] == ["embed", "head", "scalars", "hidden"]
    hidden = adamw.param_groups[-1]
    assert [names[id(p)] for p in hidden["params"]] == [n for n, p in model.named_parameters()
                                                        if n.startswith("blocks.") and p.ndim >= 2]
    assert hidden["weight_decay"] == 0.1 and hidden["lr"] == config.adamw_matrix_lr
