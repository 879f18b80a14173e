#!/usr/bin/env python3
"""Executor benchmarks on this machine (issue 5), recorded in bench/RESULTS.md.

For one GPT model it measures, with medians over the timed steps of each run:
  * tokens/s of `parallax train` and of PyTorch (bench/torch_reference.py, Debian's
    python3-torch on OpenBLAS) with the same model, ranks and one thread per rank, for one
    process and data parallelism over 2 and 4 ranks — the ratio parallax / PyTorch;
  * the executor's model-FLOPs utilisation against Eigen's measured single-thread GEMM peak
    (bench/eigen_gemm_bench, best size);
  * the executor's measured peak memory against the planner's memory model for the same plan
    (`parallax simulate --analytic --json`); with --memory-sweep also for ZeRO 1–3, TP (with and
    without sequence parallelism), PP (1F1B, GPipe) and recomputation plans.
Usage: bench/executor_bench.py [--build build/release] [--ranks 1,2,4] [--steps 6] [--json out]
                               [--shape large|small]
                               [--no-torch] [--memory-sweep]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Two shapes: "large" (where per-op overheads are small next to the GEMMs) and "small" (GPT L4
# h256 s128 V512, micro-batch 8), where they are not.
SHAPES = {
    "large": ({"name": "gpt-bench-h512", "num_layers": 4, "hidden_size": 512,
               "num_attention_heads": 8, "num_kv_heads": 8, "ffn_hidden_size": 2048,
               "vocab_size": 8192, "seq_length": 256, "max_position_embeddings": 256}, 4, 16),
    "small": ({"name": "gpt-bench-h256", "num_layers": 4, "hidden_size": 256,
               "num_attention_heads": 4, "num_kv_heads": 4, "ffn_hidden_size": 1024,
               "vocab_size": 512, "seq_length": 128, "max_position_embeddings": 128}, 8, 16),
}
COMMON = {"family": "gpt", "activation": "gelu", "norm": "layernorm",
          "position_embedding": "learned", "bias": True, "tied_embeddings": True,
          "dropout": False, "attention_impl": "standard",
          "notes": "Benchmark model for the CPU executor (not a published model)."}
MODEL = dict(COMMON, **SHAPES["large"][0])
MICRO_BATCH = SHAPES["large"][1]
GLOBAL_BATCH = SHAPES["large"][2]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def mpirun(ranks):
    if ranks == 1:
        return []
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def gemm_peak(build):
    out = run([os.path.join(build, "bench", "eigen_gemm_bench"), "--benchmark_format=json",
               "--benchmark_repetitions=3", "--benchmark_report_aggregates_only=true"])
    rates = [b["GFLOP/s"] for b in json.loads(out)["benchmarks"]
             if b.get("aggregate_name") == "median"]
    return max(rates) * 1e9


def cpu_local_peak():
    with open(os.path.join(ROOT, "hardware_profiles", "zoo", "cpu-local.json")) as f:
        return json.load(f)["device"]["peak_tflops"]["fp32"] * 1e12


MEMORY_SWEEP = [{"dp": 2, "zero_stage": 1}, {"dp": 2, "zero_stage": 2},
                {"dp": 2, "zero_stage": 3}, {"tp": 2}, {"tp": 2, "sequence_parallel": True},
                {"pp": 2}, {"pp": 2, "schedule": "gpipe"}, {"recompute": "selective"},
                {"recompute": "full"}]


def parallax_train(build, tmp, ranks, steps, extra=None):
    fields = {"dp": ranks, "tp": 1, "pp": 1, "micro_batch_size": MICRO_BATCH,
              "global_batch_size": GLOBAL_BATCH, "precision": "fp32"}
    fields.update(extra or {})
    ranks = fields["dp"] * fields["tp"] * fields["pp"]
    plan = os.path.join(tmp, "plan.json")
    with open(plan, "w") as f:
        json.dump(fields, f)
    out = run(mpirun(ranks) + [os.path.join(build, "cli", "parallax"), "train", "--model",
                               os.path.join(tmp, "model.json"), "--plan", plan, "--steps",
                               str(steps)])
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    timed = lines[1:]  # the first step warms caches and the allocator
    sim = json.loads(run([os.path.join(build, "cli", "parallax"), "simulate", "--model",
                          os.path.join(tmp, "model.json"), "--cluster", "cpu-local", "--gpus",
                          str(ranks), "--plan", plan, "--analytic", "--json"]))
    return {"tokens_per_s": statistics.median(l["tokens_per_s"] for l in timed),
            "mfu_profile": statistics.median(l["mfu"] for l in timed),
            "peak_memory_bytes": max(l["peak_memory_bytes"] for l in lines),
            "planner_memory_bytes": sim["peak_memory_bytes"],
            "planner_memory": sim["memory"]}


def torch_train(ranks, steps):
    py = "/usr/bin/python3"
    out = run([py, os.path.join(HERE, "torch_reference.py"), "--ranks", str(ranks), "--steps",
               str(steps), "--warmup", "1", "--layers", str(MODEL["num_layers"]), "--hidden",
               str(MODEL["hidden_size"]), "--heads", str(MODEL["num_attention_heads"]), "--ffn",
               str(MODEL["ffn_hidden_size"]), "--vocab", str(MODEL["vocab_size"]), "--seq",
               str(MODEL["seq_length"]), "--micro-batch", str(MICRO_BATCH), "--global-batch",
               str(GLOBAL_BATCH), "--threads", "1"])
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build", "release"))
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--memory-sweep", action="store_true")
    p.add_argument("--json")
    p.add_argument("--shape", choices=sorted(SHAPES), default="large")
    a = p.parse_args()
    global MODEL, MICRO_BATCH, GLOBAL_BATCH
    MODEL = dict(COMMON, **SHAPES[a.shape][0])
    MICRO_BATCH, GLOBAL_BATCH = SHAPES[a.shape][1], SHAPES[a.shape][2]
    tmp = tempfile.mkdtemp(prefix="parallax_bench_")
    try:
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(MODEL, f)
        peak = gemm_peak(a.build)
        profile_peak = cpu_local_peak()
        rows = []
        for ranks in [int(r) for r in a.ranks.split(",")]:
            px = parallax_train(a.build, tmp, ranks, a.steps)
            # Model FLOP/s per rank = MFU against the profile's peak × that peak.
            flops_per_rank = px["mfu_profile"] * profile_peak
            row = {"ranks": ranks, "parallax_tokens_per_s": px["tokens_per_s"],
                   "mfu_vs_eigen_gemm_peak": flops_per_rank / peak,
                   "peak_memory_bytes": px["peak_memory_bytes"],
                   "planner_memory_bytes": px["planner_memory_bytes"],
                   "memory_ratio": px["peak_memory_bytes"] / px["planner_memory_bytes"]}
            if not a.no_torch:
                th = torch_train(ranks, a.steps)
                row["pytorch_tokens_per_s"] = th["tokens_per_s"]
                row["speedup_vs_pytorch"] = px["tokens_per_s"] / th["tokens_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        result = {"model": MODEL, "micro_batch": MICRO_BATCH, "global_batch": GLOBAL_BATCH,
                  "eigen_gemm_peak_flops": peak, "runs": rows}
        print(f"\nEigen single-thread GEMM peak: {peak / 1e9:.1f} GFLOP/s")
        print("| ranks | parallax tokens/s | PyTorch tokens/s | ratio | MFU vs GEMM peak | "
              "peak memory (measured / planner) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            torch_cols = (f"{r['pytorch_tokens_per_s']:.0f} | {r['speedup_vs_pytorch']:.2f}×"
                          if "pytorch_tokens_per_s" in r else "– | –")
            print(f"| {r['ranks']} | {r['parallax_tokens_per_s']:.0f} | {torch_cols} | "
                  f"{100 * r['mfu_vs_eigen_gemm_peak']:.0f}% | "
                  f"{r['peak_memory_bytes'] / 2**20:.0f} / {r['planner_memory_bytes'] / 2**20:.0f} MiB "
                  f"({r['memory_ratio']:.3f}) |")
        if a.memory_sweep:
            print("\n| plan (micro-batch 4) | peak memory measured / planner |")
            print("|---|---|")
            for extra in MEMORY_SWEEP:
                px = parallax_train(a.build, tmp, 1, 2, extra)
                ratio = px["peak_memory_bytes"] / px["planner_memory_bytes"]
                result.setdefault("memory_sweep", []).append(dict(extra, ratio=ratio))
                print(f"| {json.dumps(extra)} | {px['peak_memory_bytes'] / 2**20:.0f} / "
                      f"{px['planner_memory_bytes'] / 2**20:.0f} MiB ({ratio:.3f}) |", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
