"""The golden launch configurations parse as their targets read them (tomllib, json, yaml) and
carry the plan's degrees and batch sizes. Runs under pytest or as a script (ctest)."""
import json
import pathlib
import sys
import tomllib

import yaml

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden" / "launch"


def plan(name):
    return json.loads((GOLDEN / name).read_text())


def test_torchtitan_toml():
    doc = tomllib.loads((GOLDEN / "llama2-70b-torchtitan.toml").read_text())
    p = plan("llama2-70b-tp8pp8v2.plan.json")
    par = doc["parallelism"]
    assert par["tensor_parallel_degree"] == p["tp"]
    assert par["pipeline_parallel_degree"] == p["pp"]
    assert par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"] == p["dp"]
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_microbatch_size"] == p["micro_batch_size"]
    assert doc["training"]["global_batch_size"] == p["global_batch_size"]
    assert doc["training"]["local_batch_size"] * p["dp"] == p["global_batch_size"]
    assert doc["activation_checkpoint"]["mode"] == "full"


def test_deepspeed_json():
    doc = json.loads((GOLDEN / "gpt3-deepspeed.json").read_text())
    p = plan("gpt3-175b-tp8pp8-1f1b.plan.json")
    assert doc["train_batch_size"] == p["global_batch_size"]
    assert doc["train_micro_batch_size_per_gpu"] == p["micro_batch_size"]
    assert doc["gradient_accumulation_steps"] == p["global_batch_size"] // (p["dp"] * p["micro_batch_size"])
    assert doc["zero_optimization"]["stage"] == p["zero_stage"]
    assert doc["pipeline"]["stages"] == p["pp"]
    assert doc["tensor_parallel"]["autotp_size"] == p["tp"]
    assert doc["bf16"]["enabled"] is True


def test_mpijob_yaml():
    docs = list(yaml.safe_load_all((GOLDEN / "gpt3-mpijob.yaml").read_text()))
    config, job = docs
    p = plan("gpt3-175b-tp8pp8v2.plan.json")
    assert config["kind"] == "ConfigMap"
    carried = json.loads(config["data"]["plan.json"])
    for key in ("dp", "tp", "pp", "micro_batch_size", "global_batch_size", "virtual_stages"):
        assert carried[key] == p[key], key
    assert job["kind"] == "MPIJob" and job["apiVersion"] == "kubeflow.org/v2beta1"
    spec = job["spec"]
    gpus = p["dp"] * p["tp"] * p["pp"]
    assert spec["slotsPerWorker"] * spec["mpiReplicaSpecs"]["Worker"]["replicas"] == gpus
    command = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["mpirun", "-np", str(gpus)]


def test_slurm_and_megatron_text():
    sbatch = (GOLDEN / "gpt3-slurm.sbatch").read_text()
    assert "#SBATCH --nodes=128" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert "srun" in sbatch and "parallax train" in sbatch
    args = (GOLDEN / "gpt3-megatron.sh").read_text()
    for flag in ("--tensor-model-parallel-size 8", "--pipeline-model-parallel-size 8",
                 "--global-batch-size 1536", "--micro-batch-size 1"):
        assert flag in args, flag


if __name__ == "__main__":
    failed = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print(f"ok {name}")
            except AssertionError as e:
                failed += 1
                print(f"FAILED {name}: {e!r}")
    sys.exit(1 if failed else 0)
