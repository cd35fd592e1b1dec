"""nanoflow beside nanoGPT on this machine, in alternating rounds, as issue 15's closing notes
report them: each round runs `cargo bench -p nanoflow-stages --bench model` and
`nanogpt_cpu.py` one after the other for each shape and thread count, and the table gives both
sides' medians and minima over the rounds' medians and minima, and their ratios.

    python stages/benches/side_by_side.py PATH/TO/nanoGPT [--python PYTHON] [--rounds N]
        [--threads 1,2] [--binary PATH] [recipe] [char] [gpt2] [sample]

The nanoflow side is the bench binary cargo builds (`cargo bench --no-run` first, so a build is
never timed), or PATH (a copy kept from another commit, to compare two builds); PYTHON (default: this one) needs torch. Run it on a quiet machine: `uptime` and
`lscpu`'s model name are printed with the table.
"""

import os
import re
import statistics
import subprocess
import sys

args = sys.argv[1:]
nanogpt = args.pop(0)
python = sys.executable
rounds = 3
threads = [1, 2]
binary = None
while any(a.startswith("--") for a in args):
    i = next(i for i, a in enumerate(args) if a.startswith("--"))
    flag, value = args.pop(i), args.pop(i)
    if flag == "--python":
        python = value
    elif flag == "--rounds":
        rounds = int(value)
    elif flag == "--threads":
        threads = [int(t) for t in value.split(",")]
    elif flag == "--binary":
        binary = value
shapes = [a for a in args if a in ("recipe", "char", "gpt2", "sample")] or ["recipe"]
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))

if binary is None:
    built = subprocess.run(
        ["cargo", "bench", "-p", "nanoflow-stages", "--bench", "model", "--no-run", "--message-format", "short"],
        cwd=root, capture_output=True, text=True, check=True,
    )
    binary = re.search(r"\((\S+/model-[0-9a-f]+)\)", built.stderr).group(1)


def run(command, n):
    env = dict(os.environ, RAYON_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    return out


def train_times(out):
    """(median, min) ms/iter of the first train line."""
    m = re.search(r"([\d.]+) ms/iter median \([\d.]+ mean, ([\d.]+) min\)", out)
    return float(m.group(1)), float(m.group(2))


def sample_rates(out):
    """tokens/s per sampling line: nanoflow's with the KV cache, nanoGPT's as it samples."""
    pattern = r"kv cache on : ([\d.]+) tokens/s|recomputing the context\): ([\d.]+)"
    return [float(cached or recomputed) for cached, recomputed in re.findall(pattern, out)]


results = {}
for r in range(rounds):
    for shape in shapes:
        for n in threads:
            if shape == "sample":
                ours = sample_rates(run([binary, "--bench", "sample"], n))
                theirs = sample_rates(run([python, os.path.join(here, "nanogpt_cpu.py"), nanogpt, "sample"], n))
            else:
                ours = train_times(run([binary, "--bench", "train", shape], n))
                theirs = train_times(run([python, os.path.join(here, "nanogpt_cpu.py"), nanogpt, "train", shape], n))
            results.setdefault((shape, n), []).append((ours, theirs))
            print(f"round {r + 1}, {shape}, {n} thread(s): nanoflow {ours}, nanoGPT {theirs}", flush=True)

print()
print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
cpu = [l for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if "Model name" in l]
print(cpu[0].split(":", 1)[1].strip() if cpu else "")
print()
print("| shape | threads | nanoflow median (min) | nanoGPT median (min) | ratio median (min) |")
print("| --- | --- | --- | --- | --- |")
for (shape, n), rows in results.items():
    if shape == "sample":
        for k, name in enumerate(["shakespeare-char shape", "GPT-2 124M shape"]):
            ours = [row[0][k] for row in rows]
            theirs = [row[1][k] for row in rows]
            print(
                f"| sample, {name} (tokens/s) | {n} | {statistics.median(ours):.1f} ({max(ours):.1f} max) | "
                f"{statistics.median(theirs):.1f} ({max(theirs):.1f} max) | "
                f"{statistics.median(ours) / statistics.median(theirs):.2f}x |"
            )
        continue
    ours_median = statistics.median(row[0][0] for row in rows)
    ours_min = min(row[0][1] for row in rows)
    theirs_median = statistics.median(row[1][0] for row in rows)
    theirs_min = min(row[1][1] for row in rows)
    print(
        f"| {shape} (ms/iter) | {n} | {ours_median:.1f} ({ours_min:.1f}) | {theirs_median:.1f} ({theirs_min:.1f}) | "
        f"{ours_median / theirs_median:.2f}x ({ours_min / theirs_min:.2f}x) |"
    )
