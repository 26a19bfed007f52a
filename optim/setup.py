"""Splits a GPT's parameters between the optimizers, each group with its own learning rate."""
import torch

from optim.muon import Muon


def parameter_roles(model):
    """{role: [parameters]}: hidden matrices, gates, token embedding, value embeddings, head, scalars."""
    blocks = [b for b in model.blocks if b is not None]
    gates = [b.attn.gate.weight for b in blocks if b.attn is not None and b.attn.gate is not None]
    if model.smear_gate is not None:
        gates.insert(0, model.smear_gate.weight)
    gate_ids = {id(p) for p in gates}
    block_params = [p for b in blocks for p in b.parameters() if id(p) not in gate_ids]
    scalars = [p for p in block_params if p.ndim < 2] + [p for p in (
        getattr(model, "skip_weights", None), model.smear_lambda, model.backout_lambda) if p is not None]
    # A merged Q/K/V/O weight is a 3D stack of 4 matrices, each orthogonalised on its own.
    return dict(hidden=[p for p in block_params if p.ndim >= 2], gates=gates, embed=[model.embed.weight],
                value_embeds=[e.weight for e in model.value_embeds], head=[model.lm_head.weight], scalars=scalars)


def build_optimizers(model, config, fused=False, compile_muon=False):
    """Returns the list of optimizers for config.optimizer ('muon', 'adamw' or 'normuon').

    `fused` selects AdamW's fused kernel; `compile_muon` compiles the orthogonalisation.
    Each param group remembers its base learning rate as `initial_lr` so the schedule can scale it.
    """
    roles = parameter_roles(model)
    adam_groups = [dict(params=roles["embed"], lr=config.embed_lr, role="embed"),
                   dict(params=roles["value_embeds"], lr=config.value_embed_lr, role="value_embeds"),
                   dict(params=roles["head"], lr=config.head_lr, role="head"),
                   dict(params=roles["scalars"], lr=config.scalar_lr, role="scalars")]
    adam_groups = [g for g in adam_groups if g["params"]]
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "normuon":
        from optim.dist_adam import DistAdam
        from optim.normuon import NorMuon

        optimizers = [
            DistAdam(adam_groups, betas=betas, eps=config.adam_eps),
            NorMuon(roles["hidden"] + roles["gates"], lr=config.muon_lr, weight_decay=config.weight_decay,
                    momentum=config.muon_momentum_end, beta2=config.normuon_beta2,
                    cautious=config.cautious_weight_decay, orthogonalizer=config.muon_orthogonalizer,
                    ns_steps=config.muon_ns_steps, compile=compile_muon),
        ]
    else:
        # Gates (when a run switches them on without NorMuon) train with the scalars.
        adam_groups.append(dict(params=roles["gates"], lr=config.scalar_lr, role="gates"))
        adam = dict(betas=betas, eps=config.adam_eps, weight_decay=0.0)
        if fused:
            adam["fused"] = True
        adam_groups = [g for g in adam_groups if g["params"]]
        if config.optimizer == "adamw":
            adam_groups.append(dict(params=roles["hidden"], lr=config.adamw_matrix_lr,
                                    weight_decay=config.weight_decay, role="hidden"))
            optimizers = [torch.optim.AdamW(adam_groups, **adam)]
        elif config.optimizer == "muon":
            optimizers = [
                torch.optim.AdamW(adam_groups, **adam),
                Muon(roles["hidden"], lr=config.muon_lr, momentum=config.muon_momentum_end,
                     weight_decay=config.weight_decay, ns_steps=config.muon_ns_steps, compile=compile_muon),
            ]
        else:
            raise ValueError(f"unknown optimizer '{config.optimizer}', expected muon, adamw or normuon")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
