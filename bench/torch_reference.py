#!/usr/bin/python3
"""PyTorch baseline for `parallax train` throughput (bench/RESULTS.md, issue 5).

Trains the same GPT block Parallax's CPU executor trains (learned positions, LayerNorm, GELU
(tanh), biases, tied embeddings, AdamW, gradient clipping) in fp32 on the CPU, single process
or DistributedDataParallel (gloo) over N processes with T threads each, and prints one JSON
object: median tokens/s over the timed steps. Uses Debian's python3-torch (OpenBLAS/oneDNN).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# Threads per process are fixed before the BLAS libraries load (OpenBLAS reads its variable
# once); --threads is read early for that.
_threads = "1"
for _i, _arg in enumerate(sys.argv):
    if _arg == "--threads" and _i + 1 < len(sys.argv):
        _threads = sys.argv[_i + 1]
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc = nn.Linear(h, ffn)
        self.out = nn.Linear(ffn, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
        q = q.view(b, s, self.heads, -1).transpose(1, 2)
        k = k.view(b, s, self.heads, -1).transpose(1, 2)
        v = v.view(b, s, self.heads, -1).transpose(1, 2)
        # Materialised causal attention, as the executor computes it.
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.wte = nn.Embedding(a.vocab, a.hidden)
        self.wpe = nn.Embedding(a.seq, a.hidden)
        self.blocks = nn.ModuleList(Block(a.hidden, a.heads, a.ffn) for _ in range(a.layers))
        self.ln = nn.LayerNorm(a.hidden)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1))
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def run(rank, a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    if a.ranks > 1:
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    model = Gpt(a)
    if a.ranks > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    local = a.global_batch // a.ranks
    micro = local // a.micro_batch
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(a.steps):
        if a.ranks > 1:
            dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for k in range(micro):
            tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=gen)
            sync = a.ranks == 1 or k == micro - 1
            ctx = model.no_sync() if (a.ranks > 1 and not sync) else torch.enable_grad()
            with ctx:
                loss = model(tokens[:, :-1], tokens[:, 1:]) / micro
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if a.ranks > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        timed = times[a.warmup:]
        t = statistics.median(timed)
        print(json.dumps({"framework": "pytorch", "torch": torch.__version__, "ranks": a.ranks,
                          "threads": a.threads, "median_step_s": t,
                          "tokens_per_s": a.global_batch * a.seq / t}))
    if a.ranks > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in [("layers", 4), ("hidden", 512), ("heads", 8), ("ffn", 2048),
                          ("vocab", 8192), ("seq", 256), ("micro-batch", 4),
                          ("global-batch", 16), ("ranks", 1), ("threads", 1), ("steps", 8),
                          ("warmup", 2)]:
        p.add_argument("--" + name, type=int, default=default)
    a = p.parse_args()
    if a.ranks == 1:
        run(0, a)
    else:
        # Chosen once here, inherited by every spawned rank.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        mp.spawn(run, args=(a,), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
