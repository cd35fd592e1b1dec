"""nanoGPT's side of `cargo bench -p nanoflow-stages --bench model`, on the same machine: the
same shapes, nanoGPT's own model.py (PyTorch, CPU, no compile), the same measurements.

    python stages/benches/nanogpt_cpu.py PATH/TO/nanoGPT [train|sample]

- train: ms/iter of the CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65,
  no dropout): forward, loss, backward, clipping at 1.0 and AdamW, as train.py does them, on
  random batches; median of 30 iterations after 5 warm-up ones.
- sample: tokens/s of model.generate (sample.py's loop, which recomputes the context for every
  token) for the shakespeare-char shape (500 tokens) and GPT-2 124M's shape (100 tokens),
  random weights, temperature 0.8, top_k 200.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig  # noqa: E402

which = sys.argv[2:] or ["train", "sample"]
torch.manual_seed(1337)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
cpu_recipe = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=False)

if "train" in which:
    model = GPT(GPTConfig(**cpu_recipe))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    times = []
    for it in range(35):
        x = torch.randint(0, 65, (12, 64))
        y = torch.randint(0, 65, (12, 64))
        started = time.perf_counter()
        _, loss = model(x, y)
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it >= 5:
            times.append((time.perf_counter() - started) * 1e3)
    print(f"train, CPU recipe: {statistics.median(times):.1f} ms/iter median ({statistics.mean(times):.1f} mean, {min(times):.1f} min)")

if "sample" in which:
    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0, bias=True)
    for name, shape, new_tokens in [("shakespeare-char shape", cpu_recipe, 500), ("GPT-2 124M shape", gpt2, 100)]:
        model = GPT(GPTConfig(**shape)).eval()
        idx = torch.zeros((1, 1), dtype=torch.long)
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(idx, new_tokens, temperature=0.8, top_k=200)
            seconds = time.perf_counter() - started
        print(f"sample, {name}, {new_tokens} new tokens (recomputing the context): {new_tokens / seconds:.1f} tokens/s")
