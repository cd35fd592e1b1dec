"""The floor under a GPT-2 124M CPU training step (batch 1, block 1024), from PyTorch's side: how
long torch's own matmuls take for every linear layer of the step (forward, input gradient and
weight gradient of qkv, attention projection, MLP up and down in each of 12 layers, and the tied
50304-wide output layer), with nothing else around them. Issue 15's GPT-2 target is 0.8x
nanoGPT's whole step; when this sum alone exceeds that, the target asks for matmuls faster than
torch's (MKL's) on this CPU.

    python stages/benches/torch_matmuls.py [THREADS]     # default: torch's default count

Each product's time is the best of 3 after 2 untimed runs.
"""

import sys
import time

import torch

if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
N, C, V = 1024, 768, 50304
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def products(o, i):
    """A linear layer (o, i) over N rows: the forward, the input's and the weight's gradients."""
    x, w, dy = torch.randn(N, i), torch.randn(o, i), torch.randn(N, o)
    return [
        ("forward", lambda: torch.nn.functional.linear(x, w)),
        ("dinput", lambda: dy @ w),
        ("dweight", lambda: dy.t() @ x),
    ]


layers = [("qkv", 12, 3 * C, C), ("attn proj", 12, C, C), ("mlp up", 12, 4 * C, C), ("mlp down", 12, C, 4 * C)]
total, flops = 0.0, 0
for name, count, o, i in layers + [("lm_head", 1, V, C)]:
    for kind, product in products(o, i):
        product(), product()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - started)
        work = 2 * N * o * i
        total, flops = total + best * count, flops + work * count
        print(f"{name:9s} {kind:7s} x{count:2d}: {best * 1e3:8.1f} ms each, {work / best / 1e9:5.1f} GFLOP/s")
print(f"all linear layers of the step: {total:.2f} s for {flops / 1e9:.0f} GFLOP ({flops / total / 1e9:.1f} GFLOP/s)")
