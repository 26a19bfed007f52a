"""Splits a GPT's parameters between Muon and AdamW, each group with its own learning rate."""
import torch

from optim.muon import Muon


def build_optimizers(model, config, fused=False, compile_muon=False):
    """Returns the list of optimizers for config.optimizer ('muon' or 'adamw').

    `fused` selects AdamW's fused kernel; `compile_muon` compiles Muon's Newton-Schulz iteration.
    Each param group remembers its base learning rate as `initial_lr` so the schedule can scale it.
    """
    hidden_matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.blocks.parameters() if p.ndim < 2] + [model.skip_weights]
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=0.0)
    if fused:
        adam["fused"] = True
    groups = [
        dict(params=[model.embed.weight], lr=config.embed_lr),
        dict(params=[model.lm_head.weight], lr=config.head_lr),
        dict(params=scalars, lr=config.scalar_lr),
    ]
    if config.optimizer == "adamw":
        groups.append(dict(params=hidden_matrices, lr=config.adamw_matrix_lr, weight_decay=config.weight_decay))
        optimizers = [torch.optim.AdamW(groups, **adam)]
    elif config.optimizer == "muon":
        optimizers = [
            torch.optim.AdamW(groups, **adam),
            Muon(hidden_matrices, lr=config.muon_lr, momentum=config.muon_momentum_end,
                 weight_decay=config.weight_decay, ns_steps=config.muon_ns_steps, compile=compile_muon),
        ]
    else:
        raise ValueError(f"unknown optimizer '{config.optimizer}', expected muon or adamw")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
