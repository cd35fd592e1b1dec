"""nanoGPT's side of `cargo bench -p nanoflow-stages --bench model`, on the same machine: the
same shapes, nanoGPT's own model.py (PyTorch, CPU, no compile), the same measurements.

    python stages/benches/nanogpt_cpu.py PATH/TO/nanoGPT [train|sample] [recipe|char|gpt2]

- train: ms/iter of forward, loss, backward, clipping at 1.0 and AdamW, as train.py does them,
  on random batches, for the CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab
  65, no dropout; median of 30 iterations after 5 warm-up ones), the default char config
  (6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2) and GPT-2 124M at batch 1,
  block 1024 (vocab 50304); the two large shapes: 3 iterations after 1 warm-up.
- sample: tokens/s of sample.py's loop (5 samples one after another, model.generate
  recomputing the context for every token) for the shakespeare-char shape (500 tokens each) and
  GPT-2 124M's shape (100 tokens each), random weights, temperature 0.8, top_k 200; the
  shakespeare-char shape's median of 3 timed runs after an untimed one, GPT-2's one run.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig  # noqa: E402

which = [arg for arg in sys.argv[2:] if arg in ("train", "sample")] or ["train", "sample"]
shapes = [arg for arg in sys.argv[2:] if arg in ("recipe", "char", "gpt2")] or ["recipe", "char", "gpt2"]
torch.manual_seed(1337)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
cpu_recipe = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=False)

char_default = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.2, bias=False)
gpt2_train = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True)
train_shapes = [("recipe", cpu_recipe, 12, 5, 30), ("char", char_default, 64, 1, 3), ("gpt2", gpt2_train, 1, 1, 3)]

if "train" in which:
    for name, shape, batch, warm_up, iters in train_shapes:
        if name not in shapes:
            continue
        model = GPT(GPTConfig(**shape))
        model.train()
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        times = []
        t = shape["block_size"]
        for it in range(warm_up + iters):
            x = torch.randint(0, shape["vocab_size"], (batch, t))
            y = torch.randint(0, shape["vocab_size"], (batch, t))
            started = time.perf_counter()
            _, loss = model(x, y)
            loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if it >= warm_up:
                times.append((time.perf_counter() - started) * 1e3)
        print(
            f"train, {name} ({batch}x{t} tokens/iter): {statistics.median(times):.1f} ms/iter median "
            f"({statistics.mean(times):.1f} mean, {min(times):.1f} min)"
        )

if "sample" in which:
    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0, bias=True)
    samples = 5
    for key, name, shape, new_tokens, warm_up, timed in [
        ("recipe", "shakespeare-char shape", cpu_recipe, 500, 1, 3),
        ("gpt2", "GPT-2 124M shape", gpt2, 100, 0, 1),
    ]:
        if key not in shapes:
            continue
        model = GPT(GPTConfig(**shape)).eval()
        idx = torch.zeros((1, 1), dtype=torch.long)
        rates = []
        with torch.no_grad():
            for run in range(warm_up + timed):
                started = time.perf_counter()
                # sample.py's loop: one sample after another.
                for _ in range(samples):
                    model.generate(idx, new_tokens, temperature=0.8, top_k=200)
                if run >= warm_up:
                    rates.append(samples * new_tokens / (time.perf_counter() - started))
        print(
            f"sample, {name}, {samples} x {new_tokens} new tokens (recomputing the context): "
            f"{statistics.median(rates):.1f} tokens/s"
        )
