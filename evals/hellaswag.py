"""HellaSwag accuracy of a checkpoint: each of the 4 endings scored by its mean token loss.

    python evals/hellaswag.py --checkpoint checkpoints/step_003000.pt
    torchrun --standalone --nproc_per_node=8 evals/hellaswag.py --checkpoint ...   # examples split across ranks
    python evals/hellaswag.py --checkpoint ... --data-files local.jsonl             # same format, local file

Reads the `Rowan/hellaswag` validation split through `datasets` (fields `ctx`, `endings`,
`label`). The lowest mean loss over an ending's tokens, given the context, is the answer
(the length-normalised score, acc_norm in most reports).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from data.shards import EOT_TOKEN  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402


def load_examples(data_files=None, limit=None):
    import datasets

    if data_files:
        dataset = datasets.load_dataset("json", data_files=data_files, split="train")
    else:
        dataset = datasets.load_dataset("Rowan/hellaswag", split="validation")
    examples = [dict(ctx=e["ctx"], endings=list(e["endings"]), label=int(e["label"])) for e in dataset]
    return examples[:limit] if limit else examples


@torch.no_grad()
def ending_losses(model, encoder, example, max_seq_len, device):
    """Mean cross-entropy of each ending's tokens after <|endoftext|> + context."""
    context = [EOT_TOKEN] + encoder.encode_ordinary(example["ctx"])
    losses = []
    for ending in example["endings"]:
        ending_tokens = encoder.encode_ordinary(" " + ending)
        tokens = (context + ending_tokens)[-(max_seq_len + 1):]
        idx = torch.tensor([tokens[:-1]], device=device)
        targets = torch.tensor(tokens[1:], device=device)
        logits = model(idx)[0].float()
        per_token = F.cross_entropy(logits, targets, reduction="none")
        losses.append(per_token[-len(ending_tokens):].mean().item())
    return losses


def evaluate(model, examples, max_seq_len, device, rank=0, world_size=1, progress=False):
    """(correct, total) over this rank's examples: every world_size-th one, starting at rank."""
    from tqdm import tqdm

    encoder = gpt2_encoding()
    correct = total = 0
    for example in tqdm(examples[rank::world_size], desc="hellaswag", disable=not progress):
        losses = ending_losses(model, encoder, example, max_seq_len, device)
        correct += int(min(range(len(losses)), key=losses.__getitem__) == example["label"])
        total += 1
    return correct, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-files", nargs="+", help="local JSONL in the dataset's format instead of the hub")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU")
    args = parser.parse_args(argv)
    distributed = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here: pass --device cpu", file=sys.stderr)
        return 2
    if use_cuda and local_rank >= torch.cuda.device_count():
        print(f"error: rank {local_rank} on this machine needs CUDA device {local_rank}, and it has "
              f"{torch.cuda.device_count()}: start at most that many processes, or pass --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        gpt2_encoding()
        model, config = model_from_checkpoint(args.checkpoint, device, gpt2_tokens=True)
    except (CheckpointError, TokenizerUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        examples = load_examples(args.data_files, args.limit)
    except Exception as e:  # noqa: BLE001 - the hub or a local file: say which and why
        source = " ".join(args.data_files) if args.data_files else "Rowan/hellaswag from the hub"
        print(f"error: could not load {source} ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    correct, total = evaluate(model, examples, config["seq_len"], device, rank, world_size, progress=rank == 0)
    if distributed:
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        correct, total = counts.tolist()
        dist.destroy_process_group()
    if rank == 0:
        print(f"hellaswag accuracy: {correct}/{total} = {correct / max(total, 1):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
