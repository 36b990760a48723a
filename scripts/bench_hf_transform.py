"""Wall time of fracfx.transform on Hugging Face GPT-2 at full size (12 layers, 768 wide, random
init, no weights downloaded): the torch.export capture path. Needs the `hf` extra.

    python scripts/bench_hf_transform.py [--layers 12] [--width 768] [--seq 64] [--batch 2] [--repeats 3]

The default example batch of 2 is captured with a dynamic batch dimension (the exported graph
then runs, and exports to ONNX, at any batch); --batch 1 is captured static (torch.export
specialises sizes 0 and 1), which is faster (measured under load 6: 5.5 s static vs 7.1 s dynamic).

Prints the median of --repeats runs after one warm-up run (imports, torch.export's caches).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import transformers

    import fracfx

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (args.batch, args.seq))}
    fracfx.transform(model, example_inputs=inputs)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        qm = fracfx.transform(model, example_inputs=inputs)
        times.append(time.perf_counter() - start)
    quantized = sum(1 for n in qm.graph.nodes if n.op == "call_module" and ".grad" in str(n.target))
    print(f"fracfx.transform(hf-gpt2, {args.layers} layers, width {args.width}, batch {args.batch}, seq {args.seq}): median {statistics.median(times):.3f} s "
          f"over {args.repeats} runs (min {min(times):.3f}, max {max(times):.3f}); {quantized} quantized ops, capture={qm.meta['fracfx_captured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
