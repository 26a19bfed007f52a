"""Time forward+backward+optimizer steps of a preset's model on random tokens, per autocast dtype.

    python scripts/bench_step.py --preset cpu-tiny --dtypes float32 bfloat16
    python scripts/bench_step.py --preset speedrun --device cuda --steps 20

Prints one line per dtype: median step time and tokens/s. Data loading is not included.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import PRESETS, Config, make_plan  # noqa: E402
from model.gpt import GPT  # noqa: E402
from optim.optimizer import Optimizer  # noqa: E402
from training.setup import compile_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=list(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tokens", type=int, default=0,
                        help="tokens per step (default: the preset's batch, at most 65,536)")
    args = parser.parse_args()
    config = Config(**PRESETS[args.preset])
    device = torch.device(args.device)
    rows = (args.tokens or min(config.batch_tokens, 65536)) // config.seq_len
    print(f"{args.preset}: {config.num_layers} layers x {config.model_dim}, {rows} x {config.seq_len} tokens a step, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for dtype_name in args.dtypes:
        torch.manual_seed(0)
        model = GPT.from_config(config, "flex" if device.type == "cuda" else "sdpa").to(device)
        optimizer = Optimizer(model, make_plan(config))
        forward = compile_model(model) if args.compile else model
        dtype = getattr(torch, dtype_name)
        idx = torch.randint(0, config.vocab_size, (rows, config.seq_len + 1), device=device)
        times = []
        for step in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = forward(idx[:, :-1], idx[:, 1:])
            loss.backward()
            for opt in optimizer.parts:  # every optimizer every step: the most work a step can do
                opt.step()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"{dtype_name:>9}: {1000 * median:8.1f} ms/step  {rows * config.seq_len / median:10.0f} tokens/s")


if __name__ == "__main__":
    main()
