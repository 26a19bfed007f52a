"""The run's configuration: every hyperparameter and setting in one dataclass (`Config`), the
presets that name published records, the command line that sets any field (`--field-name value`),
and the plan: the config parsed and checked once into typed values (`make_plan`).

The ground of the project: it imports nothing of it. Data, model and optimizers read the plan
(layer layouts, stages, LR stages as typed records) and never parse a string field themselves.
"""
import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>: every document of GPT-2's shards starts with it
GPT2_VOCAB_SIZE = 50257


@dataclass
class Config:
    """Defaults are the `record11` preset: record #11 of KellerJordan/modded-nanogpt (2024-11-10)."""
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # the leaderboard's fixed validation set size
    bos_align: bool = False  # start every training row at a document start (see data/loader.py)
    max_doc_len: int = 0  # with bos_align, cut documents to this many tokens (0: no limit)
    # with bos_align, per stage (one more entry: the extension's), documents cut to this many tokens
    # (0: no limit), e.g. 896,2048,2048 (HEAD); the rest of a cut document is dropped ("": --max-doc-len throughout)
    max_doc_len_stages: str = ""
    data_wrap: bool = False  # start over when the train files run out, instead of failing
    # with bos_align, at a train shard's end: continue (the row goes on in the next shard) or restart
    # (records #46 and later: the step's rows so far and the shard's rest are dropped, and the step
    # starts again at the next shard's first document)
    shard_end: str = "continue"
    # batch: global tokens per optimizer step, and tokens per forward pass on one rank
    batch_tokens: int = 8 * 64 * 1024
    micro_batch_tokens: str = "auto"  # tokens per forward pass, or auto: the largest that fits (training/memory.py)
    # a row too long for one forward pass on a small card is split at document starts into pieces of at most
    # this many tokens (data/loader.py says what changes): auto (where micro-batch auto finds that one row
    # does not fit), off, or a number of tokens (with --bos-align, at least the longest document)
    row_split_tokens: str = "auto"
    seq_len: int = 1024
    val_seq_len: int = 0  # row length of validation (0: seq_len)
    # stages: the scheduled steps (steps - extension_steps) split into equal stages, each with
    # its batch and attention windows; the extension steps keep the last stage's batch
    batch_stages: str = ""  # per stage, a multiple of batch_tokens and seq_len, e.g. 1,2,3 ("": one stage)
    # where the equal stages of N scheduled steps end: ceil (record #46: step s is in stage count*s//N, so
    # stage i starts at ceil(i*N/count)) or round (HEAD: stage i ends at Python's round((i/count)*N))
    stage_boundaries: str = "ceil"
    extension_steps: int = 0
    window_stages: str = ""  # per stage, short/long attention window in blocks, then the extension's ("": no window)
    final_window: str = ""  # short/long window of the final validation ("": the last stage's)
    window_block: int = 128  # tokens per window block
    # model
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 768
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128
    bos_token: int = EOT_TOKEN  # the token that begins every document: bos_align and doc_masking look for it
    logit_softcap: float = 30.0
    softcap: str = "tanh"  # tanh: cap*tanh(z/cap); sigmoid: cap*sigmoid(z/softcap_temperature)
    softcap_temperature: float = 7.5
    doc_masking: bool = True  # no token attends across an <|endoftext|> boundary
    # layer layouts: comma-separated layer indices, negative ones counted from the end
    attention_free_layers: str = ""
    mlp_free_layers: str = ""
    long_window_layers: str = ""  # layers with the long window (the others take the short one)
    value_embed_layers: str = ""  # layer:table pairs; value embedding tables mixed into attention values
    value_residual: bool = True  # every layer's values mix in the first attention layer's
    unet_skips: str = "all"  # all: each encoder-half output joins its mirror layer; src:dst: one gated skip; "": none
    backout_layer: str = ""  # subtract a learned share of this layer's output before the head ("": off)
    x0_mix_init: str = "1,0"  # initial weights of the residual stream and of the embedding x0 in each layer
    smear_gate: bool = False  # each token adds a gated share of the previous token's embedding
    attn_gate: bool = False  # per-head sigmoid gate on attention output, from the input's first gate_dims
    merged_qkvo: bool = False  # Q, K, V and O stored as one (4, dim, dim) weight: q, k, v in one matmul
    gate_dims: int = 12
    rope_base: float = 10000.0
    rope_truncated: bool = False  # rotate only a quarter of the frequencies, keep the rest stationary
    attn_scale: float = 0.0  # softmax scale (0: 1/sqrt(head_dim))
    yarn: bool = False  # stretch slow rotary frequencies and grow attn_scale when the long window grows
    hidden_init: str = "torch"  # torch: nn.Linear's default; uniform: U(+-sqrt(3)/2/sqrt(model_dim)), zero outputs
    fp8_head: bool = False  # float8 LM head in training where the device supports it
    fp8_head_scales: str = "record46"  # its operands' scales: record46 (derived from the width) or head (tuned)
    # the leaderboard's HEAD (docs/RECORD-HEAD.md); each off by default, as records #11 and #46 have them
    residual: str = "block"  # block: x = a x + b x0 before each layer (#46); sublayer: x = r x + p f(x) per
    # sublayer, with x0 (and the bigram embedding) added after attention under learned gates (HEAD)
    attn_input_layers: str = ""  # layer:source pairs: the layer's attention reads norm(stream after source)
    qkvo_lambdas: bool = False  # learned scalars on W_qkv (0.5) and W_O (1.0) instead of #46's value mix
    value_embed_gate: bool = False  # value embeddings added under a per-head gate 2 sigmoid(W [x[:6], ve[:6]])
    value_embed_std: float = 1.0  # init std of the value-embedding tables
    paired_head_layers: str = ""  # layers whose heads attend in pairs over an interleaved sequence
    key_offset: bool = False  # long-window layers (not paired) shift their keys' stationary half one token on
    xsa_layers: str = ""  # layers that remove a learned share of each head's output along its own value
    dc_layers: str = ""  # layers with a head-mixing local softmax over the last dc_window keys (DC-MHA)
    dc_window: int = 112
    gated_attn_layers: str = ""  # layers whose heads' outputs are scaled by learned per-token gates
    bigram_rows: int = 0  # rows of the bigram hash embedding added to the stream (0: none)
    bigram_sign_rows: int = 8192  # rows of its fixed +-1 sign table
    mudd: bool = False  # dynamic dense connections into the last layer and after it (instead of a backout)
    mudd_gates: bool = False  # the gates (XSA, output, injection, skip, DC) come from per-token MLPs; off: learned constants
    mudd_gate_layer: int = 4  # the layer at whose start the second gate MLP reads the stream
    rope_pairs: str = "halves"  # rotary pairs: halves (j, j + head_dim/2) or adjacent (2j, 2j+1)
    head_init_std: float = 0.0  # init std of the head (0: zero)
    softcap_offset: float = 0.0  # sigmoid soft-cap cap * sigmoid((z + offset) / temperature)
    # the number of leading stages in which the embedding and head are one tied weight; they untie after
    # the update of the untie step, the first step of the next stage made odd (HEAD: 2, step 847); 0: untied
    tied_head_stages: int = 0
    loss_reduction: str = "mean"  # mean or sum of the training loss over a micro-batch's tokens
    # training loss weights per stage (one more entry: the extension's; without it the extension keeps the
    # last stage's end): multi-token prediction, a '/'-list weighting the next 1, 2, ... tokens, and the
    # prefix-token loss; a weight is a number or start>end, linear over the stage. HEAD:
    # 1/0.5/0.25>0,1/0.5>0,1 and 0.25,0.25>0,0. "": next token only (1), no prefix loss (0)
    mtp_weight_stages: str = ""
    prefix_weight_stages: str = ""
    # where the prefix-token loss's table comes from: gpt2 (GPT-2's vocabulary, data/prefix_tokens.py)
    # or a .npy file of vocab_size token ids (-1: no prefix)
    prefix_table: str = "gpt2"
    # optimization
    # muon: Muon for hidden matrices + AdamW for the rest, gradients averaged by DDP; adamw: AdamW for
    # all; normuon: NorMuon + Adam, each reduce-scattering its own gradients (no DDP)
    optimizer: str = "muon"
    steps: int = 3000
    embed_lr: float = 0.6
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    muon_lr: float = 0.04
    muon_ns_steps: int = 5
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 0  # back to muon_momentum_start over the last steps
    muon_orthogonalizer: str = "newton_schulz"  # or polar_express (normuon only)
    muon_ns_dtype: str = "auto"  # the orthogonalisation's dtype: auto (bfloat16 on GPUs and AMX CPUs), bfloat16, float32
    normuon_beta2: float = 0.95  # NorMuon's second-moment decay (0: no normalisation)
    cautious_weight_decay: bool = True  # normuon: decay only where update and weight agree in sign
    value_embed_lr: float = 0.6
    adam_every: int = 1  # normuon: Adam steps every N steps on the sum of their gradients
    adamw_matrix_lr: float = 0.0018  # hidden matrices under --optimizer adamw
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # the Adam roles' hyperparameters (optim/optimizer.py's ROLES): fields (each role's LR from its own --*-lr field,
    # --adam-beta1/2 for all, no decay) or head (HEAD's table: per-role betas, LR --adam-lr x the role's multiplier,
    # cautious decay --adam-weight-decay x the role's multiplier, the gates on Adam, c_proj at 4x --muon-lr)
    adam_table: str = "fields"
    adam_lr: float = 0.008  # the base LR of --adam-table head (HEAD: 0.008)
    # --adam-table head: p -= u + (lr^2 x this x the role's multiplier) p where u p > 0 (HEAD: 0.005)
    adam_weight_decay: float = 0.0
    normuon_qk_block_heads: int = 0  # NorMuon orthogonalises Q and K in blocks of this many heads' rows (0: whole)
    # NorMuon's second moment of a square matrix (and block): one value per column (record #46) or per row (HEAD)
    normuon_square_stat: str = "column"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cooldown_frac: float = 0.3
    lr_floor: float = 0.0
    lr_stages: str = ""  # fraction:multiplier pairs, e.g. 0.33:1.51,0.66:1.93 (after that fraction of the scheduled steps)
    stage_lr: str = ""  # or per batch stage, the LR multiplier of its steps, e.g. 1,1.52,1.73 (HEAD)
    # where the cooldown to lr_floor starts, over N scheduled steps: fraction (record #46: the last
    # cooldown_frac*N steps, a real number) or step (HEAD: at step int(N*(1-cooldown_frac)))
    cooldown_start: str = "fraction"
    # evaluation, logging, runtime
    val_every: int = 125  # 0: validate only at the end
    train_log_every: int = 1
    untimed_warmup_steps: int = 10  # per stage: compile and warm up, then restore the initial state
    seed: int = 0
    records_dir: str = "records"
    wandb_project: str = ""  # mirror the run to Weights & Biases under this project ("" = off)
    checkpoint_dir: str = "checkpoints"
    save_every: int = 0  # also write a checkpoint every N steps (0: only at the end)
    save_final: bool = True  # write a checkpoint when the run ends
    keep_last: int = 0  # keep only this run's newest K checkpoints (0: keep all)
    resume: str = ""  # continue from a checkpoint file, or "latest" in --checkpoint-dir
    allow_code_change: bool = False  # resume a checkpoint written by different code, on purpose
    collective_timeout_s: int = 600  # a collective that waits longer (a dead rank) fails the run
    progress: str = "auto"  # live progress line on stderr: auto (when it is a terminal), on, off
    device: str = "auto"  # auto, cuda, cpu
    dtype: str = "auto"  # auto, bfloat16, float32 (autocast dtype; weights float32 but where --numerics record rounds)
    compile: str = "auto"  # auto (on for CUDA), on, off
    attention: str = "auto"  # auto (fa3 on Hopper where present, flex on CUDA, sdpa elsewhere), fa3, flex, sdpa
    # fast paths of the same math, each beside its plain PyTorch form (docs/PERFORMANCE.md); auto: the fast
    # one where the device runs it (CUDA with Triton), the plain one elsewhere
    mlp_kernel: str = "plain"  # plain, triton (relu(x W1^T)^2 fused into the matmul, forward and backward), auto
    loss_kernel: str = "plain"  # plain, triton (soft-capped multi-token/prefix cross-entropy and its gradient), auto
    fp8_mlp: bool = False  # MLP projections in float8 in training (up: dynamic scales; down: delayed), backward bf16
    bigram_grad: str = "dense"  # the bigram table's gradient exchange: dense (reduce-scatter), sparse (touched rows)
    mantissa_weights: bool = False  # NorMuon's matrices kept as bf16 + a 16-bit mantissa: an exact float32 master
    # a folder of compiled kernels per torch build and device model, loaded before and saved after the
    # untimed warm-up, so a second run compiles little ("": none)
    compile_cache: str = "compile_cache"
    # record: round where the preset's record rounds to bf16 (docs/RECORD46.md section 11), whatever
    # --dtype says; float32: keep those tensors in float32
    numerics: str = "float32"


# Record #46 (2025-11-29, "Batch size schedule"): docs/RECORD46.md writes its recipe out from the
# record's log, and its section 10 maps each technique to these fields.
RECORD46 = dict(
    # data and stages: 8 packed BOS-aligned rows per step, 16,384 tokens each, then 2x and 3x as long
    bos_align=True, max_doc_len=2048, shard_end="restart", batch_tokens=131_072, seq_len=16_384, val_seq_len=262_144,
    batch_stages="1,2,3", steps=2160, extension_steps=40,
    window_stages="1/3,3/7,5/11,6/13", final_window="6/20", window_block=128,
    # model
    attention_free_layers="0,7", mlp_free_layers="0", long_window_layers="4,11",
    value_embed_layers="1:1,2:2,9:0,10:1,11:2", value_residual=False, unet_skips="4:7", backout_layer="8",
    x0_mix_init="1.1,0", smear_gate=True, attn_gate=True, gate_dims=12, merged_qkvo=True, rope_base=1024.0, rope_truncated=True,
    attn_scale=0.1, yarn=True, hidden_init="uniform", fp8_head=True, softcap="sigmoid", logit_softcap=30.0,
    softcap_temperature=7.5, loss_reduction="sum",
    # optimizers and schedules
    optimizer="normuon", muon_lr=0.023, weight_decay=1.2, muon_orthogonalizer="polar_express", normuon_beta2=0.95,
    cautious_weight_decay=True, muon_momentum_cooldown_steps=50,
    embed_lr=0.6, value_embed_lr=0.6, head_lr=0.008, scalar_lr=0.04, adam_beta1=0.65, adam_beta2=0.95,
    adam_every=2, cooldown_frac=0.55, lr_floor=0.1, lr_stages="0.33:1.51,0.66:1.93",
    # the record's step lines are not synchronised; here they are, so log every 10th to keep the
    # GPU queue full in between
    val_every=250, train_log_every=10,
    # the record's bf16 roundings (weights and Adam moments of its tables, head and gates; rotary
    # tables; Polar Express; the head's logits): the loss it would have computed
    numerics="record",
)

# The leaderboard's HEAD (modded-nanogpt f411b3d3, 2026-08-01, record #89's time): docs/RECORD-HEAD.md
# writes it out from its code; #46's fields it keeps come from RECORD46.
HEAD = {**RECORD46, **dict(
    # data and stages: #46's batches and windows; stage ends at round(N/3), round(2N/3); documents
    # cut to 896 tokens in the first stage
    max_doc_len=0, max_doc_len_stages="896,2048,2048", steps=1285, extension_steps=15, stage_boundaries="round",
    # model: 11 layers, attention in all but layer 6
    num_layers=11, attention_free_layers="6", mlp_free_layers="", long_window_layers="3,10",
    value_embed_layers="1:0,2:1,8:2,9:3,10:4", value_embed_std=0.01, value_embed_gate=True, unet_skips="3:6",
    backout_layer="", attn_gate=False, residual="sublayer", attn_input_layers="8:7,9:7,10:7", qkvo_lambdas=True,
    paired_head_layers="0,2,5,9", key_offset=True, xsa_layers="1,3,4,7", dc_layers="10", dc_window=112,
    gated_attn_layers="3,10", bigram_rows=50304 * 15 // 2, bigram_sign_rows=8192, mudd=True, mudd_gates=True,
    mudd_gate_layer=4, rope_pairs="adjacent", hidden_init="uniform_qkvo", head_init_std=0.005,
    fp8_head_scales="head", logit_softcap=23.0, softcap_offset=5.0,
    # the loss: the next three tokens and the target's prefix token, by stage
    mtp_weight_stages="1/0.5/0.25>0,1/0.5>0,1", prefix_weight_stages="0.25,0.25>0,0", tied_head_stages=2,
    # optimizers and schedules
    normuon_beta2=0.9, normuon_qk_block_heads=2, normuon_square_stat="row", adam_table="head", adam_lr=0.008,
    adam_eps=1e-10, adam_weight_decay=0.005, lr_stages="", stage_lr="1,1.52,1.73", cooldown_start="step",
    cooldown_frac=0.6, lr_floor=0.15,
    # its fast paths: the fused MLP and loss kernels, the MLP in float8, the bigram table's sparse gradients,
    # NorMuon's matrices in bf16 with their float32 masters' low halves beside them
    mlp_kernel="auto", loss_kernel="auto", fp8_mlp=True, bigram_grad="sparse", mantissa_weights=True,
)}

PRESETS = {
    # Record #11 exactly; `speedrun` is the newest record this project implements.
    "record11": {},
    "record46": RECORD46,
    "speedrun": HEAD,
    # HEAD's recipe scaled down to train on two CPU cores in minutes: 8 layers with HEAD's layout in
    # proportion (layer 4 without attention, the last layer MUDD's, layers 6 and 7 reading layer
    # 5's stream); 2 rows a step of 512 tokens growing 2x and 3x (long documents, like the pydocs
    # corpus's, fill a row each); HEAD's windows, DC window and document lengths in blocks of 32
    # tokens; a bigram table a sixth of HEAD's, as the width. Float8 heads and MLPs and bf16 weights stay off:
    # a CPU emulates float8 matmuls slowly, and the suite runs cpu-tiny in float32 too.
    "cpu-tiny": {**HEAD, **dict(
        num_layers=8, num_heads=2, model_dim=128, attention_free_layers="4", long_window_layers="2,7",
        value_embed_layers="1:0,6:1,7:2", unet_skips="2:4", attn_input_layers="6:5,7:5", paired_head_layers="0,6",
        xsa_layers="1,2,3,5", dc_layers="7", dc_window=28, gated_attn_layers="2,7", mudd_gate_layer=3,
        bigram_rows=50304 * 15 // 2 // 6, batch_tokens=1024, seq_len=512, max_doc_len_stages="224,512,512",
        val_tokens=16_384, val_seq_len=2048, steps=64, extension_steps=4, window_block=32,
        muon_momentum_warmup_steps=20, muon_momentum_cooldown_steps=4, val_every=20, train_log_every=10,
        untimed_warmup_steps=0, fp8_head=False, fp8_mlp=False, mantissa_weights=False,
    )},
}


# What a resume checks (training/checkpoint.py): every setting that changes a weight's shape is found
# from the weights themselves; these change what the same weights compute or read, so a checkpoint
# resumes only with the values it was saved with.
RESUME_SAME_FIELDS = ("bos_token", "doc_masking", "logit_softcap", "softcap", "optimizer", "num_heads",
                      "attention_free_layers", "mlp_free_layers", "value_embed_layers", "unet_skips", "backout_layer",
                      "attn_input_layers", "paired_head_layers", "key_offset", "rope_pairs", "softcap_offset",
                      "mudd_gate_layer", "adam_table", "normuon_qk_block_heads", "normuon_square_stat",
                      "tied_head_stages", "numerics", "xsa_layers", "dc_layers", "gated_attn_layers", "dc_window")
# Settings of the run around the model, never worth naming when a resume is refused.
RESUME_MAY_CHANGE = ("resume", "allow_code_change", "records_dir", "checkpoint_dir", "save_every", "save_final",
                     "keep_last", "progress", "wandb_project", "collective_timeout_s", "train_files", "val_files")


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def _parse_bool(text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_command_line(argv):
    """(preset, Config, plan_only) from train_gpt.py's command line; --plan asks for the plan alone."""
    parser = _OneLineParser(description="Train a GPT on FineWeb token shards and write a record log.",
                            argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", default="speedrun", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--plan", action="store_true", help="print the run's stages, steps, tokens and shards, "
                        "then exit without touching a device or the data")
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=_parse_bool if field.type is bool else field.type,
                            metavar=field.type.__name__.upper(), help=f"default {field.default!r} before the preset")
    args = vars(parser.parse_args(argv))
    preset, plan_only = args.pop("preset"), args.pop("plan", False)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': use one of {', '.join(PRESETS)}")
    return preset, dataclasses.replace(Config(), **{**PRESETS[preset], **args}), plan_only


def parse_config(argv):
    """(preset, Config) from a command line of train_gpt.py's flags (the tools take them too)."""
    preset, config, plan_only = parse_command_line(argv)
    if plan_only:
        raise ConfigError("--plan is train_gpt.py's: run python train_gpt.py ... --plan")
    return preset, config


def config_from_dict(saved):
    """The Config of a checkpoint's saved dict: fields it predates take their defaults (record #11's
    behaviour), fields this code no longer has are dropped."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})




# ----------------------------------------------------------------------------- the plan: typed, checked once

@dataclass(frozen=True)
class Stage:
    """One stage of a run: the steps [first_step, end_step) with their batch shape and attention windows.

    A step's batch is `rows` rows of `seq_len` tokens whatever the stage (record #46 grows the rows,
    not their number); the extension steps after the scheduled ones are a stage of their own.
    """
    index: int
    first_step: int
    end_step: int
    rows: int  # rows of the global batch
    seq_len: int  # tokens per row
    windows: tuple = None  # (short, long) attention windows in tokens, or None: full causal attention
    extension: bool = False  # the steps after the LR schedule's end
    # with BOS-aligned rows, documents are cut to this many tokens, counting their <|endoftext|> (0: no
    # limit); None (stages made by hand): the loader's own max_doc_len
    max_doc_len: int = None
    lr_multiplier: float = None  # the LR plateau of its steps (--stage-lr), or None: --lr-stages decides
    # loss weights at its first step and at its end, linear in between (optim.schedules.loss_weights_at):
    # of predicting the next 1, 2, ... tokens, and of the prefix-token loss
    mtp_weights_start: tuple = (1.0,)
    mtp_weights_end: tuple = (1.0,)
    prefix_weight_start: float = 0.0
    prefix_weight_end: float = 0.0

    @property
    def steps(self):
        return self.end_step - self.first_step

    @property
    def tokens_per_step(self):
        return self.rows * self.seq_len


def stage_at(stages, step):
    """The Stage of a step (0-based) among a run's stages; the last stage for steps past the end."""
    return next((s for s in stages if s.first_step <= step < s.end_step), stages[-1])


@dataclass(frozen=True)
class Layers:
    """What each layer has, from the layout fields, as non-negative layer indices."""
    attention_free: frozenset = frozenset()
    mlp_free: frozenset = frozenset()
    long_window: frozenset = frozenset()
    value_embeds: tuple = ()  # (layer, table) pairs
    unet_skip: object = "all"  # "all", None, or the (source, target) layers of one gated skip
    backout: int = None  # the layer whose output is partly subtracted before the head, or None
    attn_input: tuple = ()  # (layer, source) pairs: the layer's attention reads norm(stream after source)
    paired_heads: frozenset = frozenset()
    xsa: frozenset = frozenset()
    dc: frozenset = frozenset()
    gated_attn: frozenset = frozenset()


@dataclass(frozen=True)
class Plan:
    """A Config parsed and checked: what the model, loader, optimizers and loop read."""
    config: Config
    layers: Layers
    x0_mix_init: tuple  # weights of the residual stream and of x0 at init
    stages: tuple  # Stage records in step order; every step of the run is in exactly one
    final_windows: tuple  # (short, long) tokens for the final validation, or None
    lr_stages: tuple  # (fraction of the scheduled steps, LR multiplier from there on), sorted
    micro_batch_tokens: int = None  # first-stage tokens per forward pass; None: auto (sized to the device)
    row_split_tokens: int = None  # the most tokens of a row's piece; 0: rows are never split; None: auto
    # the last step whose update sees the embedding and head tied (--tied-head-stages): after its
    # update they untie, and they train apart from the next step on; None: untied throughout
    untie_step: int = None

    @property
    def scheduled_steps(self):
        return self.config.steps - self.config.extension_steps

    @property
    def total_tokens(self):
        return sum(stage.steps * stage.tokens_per_step for stage in self.stages)

    def stage_at(self, step):
        return stage_at(self.stages, step)

    def windows_at(self, step):
        return self.stage_at(step).windows

    def first_steps(self):
        """The first step of every stage that has steps, in order: what a warm-up must visit."""
        return [s.first_step for s in self.stages if s.steps]

    def windows_path(self, step):
        """The windows of every stage a run passed through to reach `step`, in order: setting them one
        after another rebuilds the model's YaRN state (each stretch depends on the one before)."""
        return [s.windows for s in self.stages if s.steps and s.first_step <= step]


def _flag(name):
    return "--" + name.replace("_", "-")


def _items(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _layer(text, num_layers, name):
    try:
        index = int(text)
    except ValueError:
        raise ConfigError(f"{_flag(name)}: '{text}' is not a layer index") from None
    if not -num_layers <= index < num_layers:
        raise ConfigError(f"{_flag(name)}: layer {index} does not exist in a {num_layers}-layer model "
                          f"(indices 0..{num_layers - 1}, or negative from the end)")
    return index % num_layers


def _layer_set(config, name):
    return frozenset(_layer(item, config.num_layers, name) for item in _items(getattr(config, name)))


def _layer_pairs(config, name):
    """((layer, value), ...) from a layout field of layer:value pairs (value a non-negative integer)."""
    pairs = {}
    for item in _items(getattr(config, name)):
        layer, _, value = item.partition(":")
        if not value.strip().isdigit():
            raise ConfigError(f"{_flag(name)}: '{item}' is not layer:index")
        pairs[_layer(layer, config.num_layers, name)] = int(value)
    return tuple(sorted(pairs.items()))


def _unet_skip(config):
    text = config.unet_skips.strip()
    if text in ("all", ""):
        return text or None
    source, sep, target = text.partition(":")
    if not sep:
        raise ConfigError(f"--unet-skips: '{text}' is not all, empty, or source:target")
    source, target = _layer(source, config.num_layers, "unet_skips"), _layer(target, config.num_layers, "unet_skips")
    if source >= target:
        raise ConfigError(f"--unet-skips {text}: the source layer must come before the target")
    return source, target


def _floats(text, name):
    try:
        return tuple(float(item) for item in _items(text))
    except ValueError:
        raise ConfigError(f"{_flag(name)}: '{text}' is not a comma-separated list of numbers") from None


def _windows(text, name):
    """[(short, long)] window sizes in blocks from 'short/long,...'."""
    result = []
    for item in _items(text):
        short, sep, long = item.partition("/")
        if not (sep and short.strip().isdigit() and long.strip().isdigit()) or not 0 < int(short) <= int(long):
            raise ConfigError(f"{_flag(name)}: '{item}' is not short/long with 0 < short <= long (blocks)")
        result.append((int(short), int(long)))
    return result


def _lr_stages(config):
    stages = []
    for item in _items(config.lr_stages):
        frac, sep, mult = item.partition(":")
        try:
            stages.append((float(frac), float(mult)))
        except ValueError:
            raise ConfigError(f"--lr-stages: '{item}' is not fraction:multiplier") from None
        if not sep or not 0 <= stages[-1][0] <= 1:
            raise ConfigError(f"--lr-stages: '{item}' is not fraction:multiplier with the fraction in [0, 1]")
    return tuple(sorted(stages))


def _per_stage(text, name, count, parse):
    """The values of a per-stage field, one entry per stage and optionally one more, the extension's:
    ([count values], the extension's or None)."""
    items = _items(text)
    if len(items) not in (count, count + 1):
        raise ConfigError(f"{_flag(name)} {text} has {len(items)} entries; {count} stage(s) need {count}, "
                          f"or {count + 1} with the extension's")
    values = [parse(item) for item in items]
    return values[:count], (values[count] if len(values) > count else None)


def _weight(text, name, item):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{_flag(name)}: '{item}' is not weights of numbers >= 0, each w or start>end")
    return value


def _ramp(text, name, item):
    """(start, end) of one weight written w (constant over the stage) or start>end (linear)."""
    start, sep, end = text.partition(">")
    return _weight(start, name, item), _weight(end if sep else start, name, item)


def _mtp_entry(item):
    """(start weights, end weights) of one stage of --mtp-weight-stages, e.g. 1/0.5/0.25>0."""
    ramps = [_ramp(part.strip(), "mtp_weight_stages", item) for part in item.split("/")]
    return tuple(a for a, _ in ramps), tuple(b for _, b in ramps)


def _doc_len_entry(item):
    if not item.isdigit():
        raise ConfigError(f"--max-doc-len-stages: '{item}' is not a number of tokens (0: no limit)")
    return int(item)


def _stage_fields(config, count):
    """Per stage, then for the extension steps, the Stage fields set by the per-stage fields other than
    batch and windows: maximum document length, LR multiplier, loss weights. Without its own entry, the
    extension takes the last stage's values (a weight's end value)."""
    stages = [{} for _ in range(count)]
    extension = {}
    doc_lens, doc_len_ext = [config.max_doc_len] * count, None
    if config.max_doc_len_stages.strip():
        if not config.bos_align:
            raise ConfigError("--max-doc-len-stages needs --bos-align true: contiguous rows do not cut documents")
        if config.max_doc_len:
            raise ConfigError(f"--max-doc-len-stages {config.max_doc_len_stages} replaces --max-doc-len "
                              f"{config.max_doc_len}: set --max-doc-len 0")
        doc_lens, doc_len_ext = _per_stage(config.max_doc_len_stages, "max_doc_len_stages", count, _doc_len_entry)
    for fields, doc_len in zip(stages, doc_lens):
        fields["max_doc_len"] = doc_len
    extension["max_doc_len"] = doc_lens[-1] if doc_len_ext is None else doc_len_ext
    if config.stage_lr.strip():
        if config.lr_stages.strip():
            raise ConfigError("--stage-lr and --lr-stages both set the LR multiplier: give one of them")
        multipliers = _floats(config.stage_lr, "stage_lr")
        if len(multipliers) != count or not all(math.isfinite(m) and m >= 0 for m in multipliers):
            raise ConfigError(f"--stage-lr {config.stage_lr}: give {count} multiplier(s) >= 0, one per stage "
                              "(the extension steps run at --lr-floor)")
        for fields, multiplier in zip(stages, multipliers):
            fields["lr_multiplier"] = multiplier
        extension["lr_multiplier"] = multipliers[-1]
    if config.mtp_weight_stages.strip():
        weights, weights_ext = _per_stage(config.mtp_weight_stages, "mtp_weight_stages", count, _mtp_entry)
        for fields, (start, end) in zip(stages, weights):
            fields.update(mtp_weights_start=start, mtp_weights_end=end)
        start, end = weights_ext or (weights[-1][1], weights[-1][1])
        extension.update(mtp_weights_start=start, mtp_weights_end=end)
    if config.prefix_weight_stages.strip():
        def prefix_entry(item):
            return _ramp(item, "prefix_weight_stages", item)
        weights, weights_ext = _per_stage(config.prefix_weight_stages, "prefix_weight_stages", count, prefix_entry)
        for fields, (start, end) in zip(stages, weights):
            fields.update(prefix_weight_start=start, prefix_weight_end=end)
        start, end = weights_ext or (weights[-1][1], weights[-1][1])
        extension.update(prefix_weight_start=start, prefix_weight_end=end)
    return stages, extension


def _stage_ends(config, count, scheduled):
    """The (exclusive) last steps of the count equal stages of the scheduled steps."""
    if config.stage_boundaries == "round":
        # HEAD's rule: stage i ends at Python's round (half to even) of its share of the steps: the stages'
        # shares 1/count summed in floating point, times the scheduled steps
        shares = itertools.accumulate([1 / count] * (count - 1))
        return [round(share * scheduled) for share in shares] + [scheduled]
    # step s is in stage count * s // scheduled: stage i ends where stage i + 1 starts, at ceil((i + 1) * N / count)
    return [-(-(i + 1) * scheduled // count) for i in range(count)]


def _untie_step(config, stages):
    """The untie step of --tied-head-stages k: the first step of stage k made odd (| 1), as HEAD computes it
    (Adam steps only on odd steps); None when k is 0."""
    k = config.tied_head_stages
    if k == 0:
        return None
    if not 0 < k < len(stages):
        raise ConfigError(f"--tied-head-stages {k}: give 0 (untied throughout) or a number of leading stages below "
                          f"the run's {len(stages)} stages (the head unties in the stage after them)")
    step = stages[k].first_step | 1
    if step >= config.steps:
        raise ConfigError(f"--tied-head-stages {k}: the untie step {step} (the first step of stage {k}, made odd) "
                          f"is past the run's last step {config.steps - 1}: lower it")
    return step


def _stages(config):
    """The Stage records of the batch_stages / window_stages / extension_steps fields."""
    multipliers = _floats(config.batch_stages, "batch_stages") or (1.0,)
    if any(m <= 0 or m != int(m) for m in multipliers):
        raise ConfigError(f"--batch-stages {config.batch_stages}: multipliers must be positive whole numbers")
    stage_windows = _windows(config.window_stages, "window_stages")
    final = _windows(config.final_window, "final_window")
    if len(final) > 1:
        raise ConfigError(f"--final-window {config.final_window}: give one short/long pair")
    if not 0 <= config.extension_steps < config.steps:
        raise ConfigError(f"--extension-steps {config.extension_steps} must be at least 0 and below --steps "
                          f"{config.steps}")
    if stage_windows and not config.batch_stages:
        multipliers = (1.0,) * (len(stage_windows) - (1 if config.extension_steps else 0))
        if not multipliers:
            raise ConfigError(f"--window-stages {config.window_stages}: with --extension-steps the last entry is "
                              "the extension's, which leaves no stage: give one more entry")
    # one window entry per stage, and one more for the extension steps (without it they keep the
    # last stage's; without extension steps it goes unused)
    if stage_windows and len(stage_windows) not in (len(multipliers), len(multipliers) + 1):
        raise ConfigError(
            f"--window-stages {config.window_stages} has {len(stage_windows)} entries; {len(multipliers)} "
            f"stage(s) need {len(multipliers)}, or {len(multipliers) + 1} with the extension's")
    if final and not stage_windows:
        raise ConfigError("--final-window needs --window-stages")

    def tokens(blocks):
        return (blocks[0] * config.window_block, blocks[1] * config.window_block)

    count, scheduled, rows = len(multipliers), config.steps - config.extension_steps, config.batch_tokens // config.seq_len
    fields, extension_fields = _stage_fields(config, count)
    ends = _stage_ends(config, count, scheduled)
    stages = []
    for i, (multiplier, first, end) in enumerate(zip(multipliers, [0] + ends[:-1], ends)):
        windows = tokens(stage_windows[i]) if stage_windows else None
        stages.append(Stage(i, first, end, rows, config.seq_len * int(multiplier), windows, **fields[i]))
    if config.extension_steps:
        windows = tokens(stage_windows[-1]) if stage_windows else None
        stages.append(dataclasses.replace(stages[-1], index=count, first_step=scheduled, end_step=config.steps,
                                          windows=windows, extension=True, **extension_fields))
    # without --final-window, the last entry: the extension's where there is one, used or not
    final_windows = tokens(final[0]) if final else (tokens(stage_windows[-1]) if stage_windows else None)
    return tuple(stages), final_windows


def _row_split_tokens(config, stages):
    """None (auto), 0 (off) or the most tokens a piece of a row holds, after checking the longest document fits."""
    if config.row_split_tokens in ("auto", "off"):
        return None if config.row_split_tokens == "auto" else 0
    try:
        tokens = int(config.row_split_tokens)
    except ValueError:
        raise ConfigError(f"--row-split-tokens {config.row_split_tokens} is not a number, auto or off") from None
    if tokens <= 0:
        raise ConfigError(f"--row-split-tokens must be positive (or auto, off), got {tokens}")
    if not config.bos_align:
        raise ConfigError("--row-split-tokens splits rows at document starts, which needs --bos-align true")
    longest = max(longest_document(stage) for stage in stages)
    if tokens < longest:
        raise ConfigError(f"--row-split-tokens {tokens} is shorter than the longest document a row holds ({longest} "
                          "tokens): a piece must hold a whole document; raise it or cut documents shorter "
                          "(--max-doc-len-stages)")
    if tokens % 16:
        raise ConfigError(f"--row-split-tokens {tokens} is not a multiple of 16: pieces are padded to it, and "
                          "float8 matmuls take rows in multiples of 16")
    return tokens


def longest_document(stage):
    """The most tokens of one document a BOS-aligned row of the stage holds (its inputs)."""
    return min(stage.max_doc_len or stage.seq_len, stage.seq_len)


def _micro_batch_tokens(config):
    if config.micro_batch_tokens == "auto":
        return None
    try:
        return int(config.micro_batch_tokens)
    except ValueError:
        raise ConfigError(f"--micro-batch-tokens {config.micro_batch_tokens} is not a number or auto") from None


CHOICES = dict(device=("auto", "cuda", "cpu"), dtype=("auto", "bfloat16", "float32"), compile=("auto", "on", "off"),
               progress=("auto", "on", "off"), muon_ns_dtype=("auto", "bfloat16", "float32"),
               shard_end=("continue", "restart"), numerics=("record", "float32"), stage_boundaries=("ceil", "round"),
               cooldown_start=("fraction", "step"), residual=("block", "sublayer"), rope_pairs=("halves", "adjacent"),
               fp8_head_scales=("record46", "head"), attention=("auto", "fa3", "flex", "sdpa"),
               mlp_kernel=("auto", "plain", "triton"), loss_kernel=("auto", "plain", "triton"),
               bigram_grad=("dense", "sparse"))
POSITIVE = ("steps", "batch_tokens", "seq_len", "val_tokens", "num_layers", "num_heads", "model_dim",
            "train_log_every", "adam_every", "window_block", "dc_window", "bigram_sign_rows", "value_embed_std")
NOT_NEGATIVE = ("val_every", "val_seq_len", "max_doc_len", "save_every", "keep_last", "bigram_rows", "head_init_std")


def make_plan(config):
    """Parses and checks every field that needs it, once; raises ConfigError naming the flag to change.

    The settings of one component that depend on each other (a layer layout, an optimizer's
    choices) are checked by that component (model.gpt, optim.optimizer) when it is built."""
    for name in POSITIVE:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be positive, got {getattr(config, name)}")
    for name in NOT_NEGATIVE:
        if getattr(config, name) < 0:
            meaning = {"val_every": " (only at the end)", "val_seq_len": " (the --seq-len)"}.get(name, "")
            raise ConfigError(f"{_flag(name)} must be 0{meaning} or positive, got {getattr(config, name)}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{_flag(name)} {getattr(config, name)} is not one of {', '.join(choices)}")
    if not 0 <= config.bos_token < config.vocab_size:
        gpt2_hint = f" (GPT-2's shards need {GPT2_VOCAB_SIZE} tokens)" if config.bos_token == EOT_TOKEN else ""
        raise ConfigError(f"--vocab-size {config.vocab_size} does not hold --bos-token {config.bos_token}{gpt2_hint}")
    if not 0 <= config.cooldown_frac <= 1:
        raise ConfigError(f"--cooldown-frac must be within [0, 1], got {config.cooldown_frac}")
    x0_mix_init = _floats(config.x0_mix_init, "x0_mix_init")
    if len(x0_mix_init) != 2:
        raise ConfigError(f"--x0-mix-init {config.x0_mix_init}: give two numbers")
    layers = Layers(_layer_set(config, "attention_free_layers"), _layer_set(config, "mlp_free_layers"),
                    _layer_set(config, "long_window_layers"), _layer_pairs(config, "value_embed_layers"),
                    _unet_skip(config),
                    _layer(config.backout_layer, config.num_layers, "backout_layer")
                    if config.backout_layer.strip() else None,
                    _layer_pairs(config, "attn_input_layers"), _layer_set(config, "paired_head_layers"),
                    _layer_set(config, "xsa_layers"), _layer_set(config, "dc_layers"),
                    _layer_set(config, "gated_attn_layers"))
    stages, final_windows = _stages(config)
    return Plan(config, layers, x0_mix_init, stages, final_windows, _lr_stages(config), _micro_batch_tokens(config),
                _row_split_tokens(config, stages), _untie_step(config, stages))
