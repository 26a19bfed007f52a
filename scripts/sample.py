"""Generate text from a checkpoint with the GPT-2 tokenizer.

    python scripts/sample.py --checkpoint checkpoints/step_003000.pt --prompt "The capital of France is"
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from data.shards import EOT_TOKEN, GPT2_VOCAB_SIZE  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402


@torch.no_grad()
def generate(model, prompt_tokens, max_new_tokens, temperature, top_k, max_seq_len, generator, stop_at_eot=True):
    """Sampled continuation token ids (temperature 0: greedy). The context is cropped to max_seq_len."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt_tokens], dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -max_seq_len:])[0, -1, :GPT2_VOCAB_SIZE].float()  # padded ids are never real
        if temperature == 0:
            next_token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                # Exactly top_k candidates, ties going to the lower token id as argmax's do (a stable sort
                # keeps id order): top_k=1 is greedy even where logits tie, as all do in an untrained model.
                candidates = torch.sort(logits, descending=True, stable=True).indices[:top_k]
                logits = torch.full_like(logits, float("-inf")).index_copy(0, candidates, logits[candidates])
            next_token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        if stop_at_eot and next_token == EOT_TOKEN:
            break
        new.append(next_token)
        tokens = torch.cat([tokens, torch.tensor([[next_token]], device=device)], dim=1)
    return new


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 0 or args.top_k < 0:
        parser.error("--temperature, --max-new-tokens and --top-k cannot be negative")
    try:
        encoder = gpt2_encoding()
        model, config = model_from_checkpoint(args.checkpoint, torch.device(args.device), gpt2_tokens=True)
    except (CheckpointError, TokenizerUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    prompt = [EOT_TOKEN] + encoder.encode_ordinary(args.prompt)  # documents start with <|endoftext|>
    for i in range(args.num_samples):
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, config["seq_len"], generator)
        if args.num_samples > 1:
            print(f"---- sample {i + 1}")
        print(args.prompt + encoder.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
