"""The reference backend's ``[B, D, D]`` part on a CPU: the whole batch at once
(``cdds_fast.reference.related_sampling``) against bounded chunks of pairs
(``cdds_fast.chunked_sampling.related_sampling_chunked``), forward + backward of both directions.

    python benchmarks/cpu_relation.py                  # B = 32, 64, 128 at D = 512, fp32
    python benchmarks/cpu_relation.py --batches 8 --dim 64 --reps 1

Each measurement runs in a fresh process after a warm-up on tiny tensors. Time: the median of
``--reps`` calls with the normal allocator. Peak memory: growth of the process's peak resident set
over one call, with glibc told to return every block over 64 KiB to the system at once
(``MALLOC_MMAP_THRESHOLD_``), so that the peak follows the live tensors instead of the heap the
allocator keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = {"whole batch": "reference", "chunks": "chunked"}

_CHILD = """
import json, resource, sys, time, torch, torch.utils.checkpoint
from cdds_fast.chunked_sampling import pairs_per_chunk, related_sampling_chunked
from cdds_fast.reference import related_sampling
batch, dim, reps, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fn = related_sampling_chunked if which == "chunked" else related_sampling

def call(b):
    g = torch.Generator().manual_seed(0)
    mu = [torch.randn(b, dim, generator=g) for _ in range(2)]
    sd = [0.5 + torch.rand(b, dim, generator=g) for _ in range(2)]
    x = [mu[0], sd[0], mu[1], sd[1], torch.full((dim,), 0.5), torch.full((dim,), 0.5)]
    x = [t.requires_grad_() for t in x]
    out = fn(*x)
    torch.autograd.grad(sum(o.square().sum() for o in out), x)

# warm-up: the lazy imports and one-time set-up of autograd and checkpoint, on tiny tensors (a
# warm-up at full size would set the peak the measured call is compared with)
one = torch.ones(2, requires_grad=True)
torch.utils.checkpoint.checkpoint(torch.sin, one, use_reentrant=False).sum().backward()
fn(*[torch.rand(1, 2) + 0.5 for _ in range(4)], torch.ones(2), torch.ones(2))
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    call(batch)
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
chunk = pairs_per_chunk(dim, torch.float32, torch.device("cpu"))
print(json.dumps({"times": times, "peak_mib": peak / 1024, "chunk": chunk}))
"""


def _child(batch: int, dim: int, reps: int, which: str, mmap: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**10)
    args = [sys.executable, "-c", _CHILD, str(batch), str(dim), str(reps), which]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per row (median)")
    args = parser.parse_args(argv)
    print(f"D = {args.dim}, fp32, both directions, forward + backward")
    print("| B | path | pairs a chunk | s (median) | peak MiB |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for batch in args.batches:
        for label, which in FUNCTIONS.items():
            timed = _child(batch, args.dim, args.reps, which, mmap=False)
            memory = _child(batch, args.dim, 1, which, mmap=True)
            chunk = min(timed["chunk"], batch) if which == "chunked" else batch
            seconds = statistics.median(timed["times"])
            print(f"| {batch} | {label} | {chunk} | {seconds:.2f} | {memory['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
