"""`train_gpt.py --plan`: the whole run as its plan describes it, before any device or data is touched."""
from data.cached_fineweb10B import TOKENS_PER_SHARD, shards_for_plan
from optim.schedules import lr_multiplier, muon_momentum


def _windows(windows):
    return "full causal" if windows is None else f"{windows[0]:,}/{windows[1]:,}"


def _max_doc_len(stage, config):
    if not config.bos_align:
        return "-"
    limit = config.max_doc_len if stage.max_doc_len is None else stage.max_doc_len
    return f"{limit:,}" if limit else "none"


def _weights(start, end):
    text = "/".join(f"{w:g}" for w in start)
    return text if start == end else f"{text} -> {'/'.join(f'{w:g}' for w in end)}"


def _loss_weights(stage):
    """A stage's loss weights, start -> end: the multi-token prediction's, then the prefix token's if any."""
    text = _weights(stage.mtp_weights_start, stage.mtp_weights_end)
    if stage.prefix_weight_start or stage.prefix_weight_end:
        text += f", prefix {_weights((stage.prefix_weight_start,), (stage.prefix_weight_end,))}"
    return text


def _lr_line(plan):
    c, scheduled = plan.config, plan.scheduled_steps
    stages = [s for s in plan.stages if s.steps and not s.extension]
    if stages[0].lr_multiplier is not None:
        plateau = "by stage " + ", ".join(f"{s.lr_multiplier:g}" for s in stages)
    elif plan.lr_stages:
        plateau = "1, then " + ", ".join(f"{m:g} after {f:g}" for f, m in plan.lr_stages) + " of the scheduled steps"
    else:
        plateau = "1"
    warmup = f"warm-up over {c.warmup_steps:,} steps, " if c.warmup_steps else ""
    if c.cooldown_start == "step":
        start = int(scheduled * (1 - c.cooldown_frac))
        cooldown = f"cooldown from step {start:,} = int({scheduled:,} x (1 - {c.cooldown_frac:g}))"
    else:
        cooldown = f"cooldown over the last {c.cooldown_frac:g} x {scheduled:,} steps"
    return f"LR x: {warmup}{plateau}; {cooldown} to the floor {c.lr_floor:g} at step {scheduled:,} and after"


def describe_plan(plan, preset):
    """The plan as text: a table of the stages, then the totals and the data the run reads."""
    c = plan.config
    lines = [f"preset {preset}: {c.steps:,} steps ({plan.scheduled_steps:,} scheduled + {c.extension_steps} extension), "
             f"{c.num_layers} layers x {c.model_dim}, optimizer {c.optimizer}",
             f"{'stage':>5}  {'steps':>13}  {'tokens/step':>11}  {'rows x row length':>17}  {'windows':>13}  "
             f"{'LR x (first-last)':>17}  {'momentum (first-last)':>21}  {'max doc':>7}  loss weights (start -> end)"]
    for stage in plan.stages:
        if not stage.steps:
            continue
        first, last = stage.first_step, stage.end_step - 1
        name = f"{stage.index}{'e' if stage.extension else ''}"
        lines.append(f"{name:>5}  {f'{first:,}-{last:,}':>13}  {stage.tokens_per_step:>11,}  "
                     f"{f'{stage.rows} x {stage.seq_len:,}':>17}  {_windows(stage.windows):>13}  "
                     f"{f'{lr_multiplier(plan, first):.3f}-{lr_multiplier(plan, last):.3f}':>17}  "
                     f"{f'{muon_momentum(plan, first):.3f}-{muon_momentum(plan, last):.3f}':>21}  "
                     f"{_max_doc_len(stage, c):>7}  {_loss_weights(stage)}")
    lines.append(f"stage ends (exclusive): {', '.join(f'{s.end_step:,}' for s in plan.stages if s.steps)}; "
                 "'e' marks the extension steps after the LR schedule")
    lines.append(_lr_line(plan))
    if plan.untie_step is not None:
        stage = plan.stage_at(plan.untie_step).index
        lines.append(f"embedding and head: tied through the update of step {plan.untie_step:,} (stage {stage}'s first "
                     f"odd step), untied from step {plan.untie_step + 1:,} on")
    lines.append(f"total: {c.steps:,} steps, {plan.total_tokens:,} train tokens")
    data = ("BOS-aligned rows, documents cut to each stage's max doc" if c.bos_align and c.max_doc_len_stages.strip()
            else f"BOS-aligned rows, documents cut to {c.max_doc_len:,} tokens" if c.bos_align and c.max_doc_len
            else "BOS-aligned rows" if c.bos_align else "contiguous rows")
    lines.append(f"data: {data}; validation {c.val_tokens:,} tokens in rows of {c.val_seq_len or c.seq_len:,}, "
                 f"final windows {_windows(plan.final_windows)}")
    try:
        shards = shards_for_plan(plan)
    except ValueError as e:
        shards = str(e)
    if shards is None:
        lines.append(f"train files: {c.train_files} (not FineWeb's shards: the run reads its own)")
    elif isinstance(shards, str):
        lines.append(f"train shards: {shards}")
    else:
        dataset, count = shards
        lines.append(f"train shards: {count} of {dataset} ({TOKENS_PER_SHARD:,} tokens each) and the val shard: "
                     f"python data/cached_fineweb10B.py {count}"
                     f"{'' if dataset == 'fineweb10B' else f' --dataset {dataset}'}")
    return "\n".join(lines)
