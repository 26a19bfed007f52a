"""`train_gpt.py --plan`: the whole run as its plan describes it, before any device or data is touched."""
from data.cached_fineweb10B import TOKENS_PER_SHARD, shards_for_plan
from optim.schedules import lr_multiplier, muon_momentum


def _windows(windows):
    return "full causal" if windows is None else f"{windows[0]:,}/{windows[1]:,}"


def describe_plan(plan, preset):
    """The plan as text: a table of the stages, then the totals and the data the run reads."""
    c = plan.config
    lines = [f"preset {preset}: {c.steps:,} steps ({plan.scheduled_steps:,} scheduled + {c.extension_steps} extension), "
             f"{c.num_layers} layers x {c.model_dim}, optimizer {c.optimizer}",
             f"{'stage':>5}  {'steps':>13}  {'tokens/step':>11}  {'rows x row length':>17}  {'windows':>13}  "
             f"{'LR x (first-last)':>17}  {'momentum (first-last)':>21}"]
    for stage in plan.stages:
        if not stage.steps:
            continue
        first, last = stage.first_step, stage.end_step - 1
        name = f"{stage.index}{'e' if stage.extension else ''}"
        lines.append(f"{name:>5}  {f'{first:,}-{last:,}':>13}  {stage.tokens_per_step:>11,}  "
                     f"{f'{stage.rows} x {stage.seq_len:,}':>17}  {_windows(stage.windows):>13}  "
                     f"{f'{lr_multiplier(plan, first):.3f}-{lr_multiplier(plan, last):.3f}':>17}  "
                     f"{f'{muon_momentum(plan, first):.3f}-{muon_momentum(plan, last):.3f}':>21}")
    lines.append(f"stage ends (exclusive): {', '.join(f'{s.end_step:,}' for s in plan.stages if s.steps)}; "
                 "'e' marks the extension steps after the LR schedule")
    lines.append(f"total: {c.steps:,} steps, {plan.total_tokens:,} train tokens")
    data = (f"BOS-aligned rows, documents cut to {c.max_doc_len:,} tokens" if c.bos_align and c.max_doc_len
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
