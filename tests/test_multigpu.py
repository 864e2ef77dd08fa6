"""train.gpus: data-parallel training over N GPUs of one host (loraforge.train_launch,
loraforge.distributed). The config and resource rules are checked directly; the training itself
runs for real as 2 gloo processes on the CPU (LORAFORGE_DDP_ON_CPU=1) through the real Snakemake
rule, against a single process with the same effective batch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake, small_config, write_config
from loraforge import config as lfconfig
from loraforge import resources as R
from loraforge import training_record, vram
from loraforge.distributed import DistributedConfigError, accumulation_per_process, per_process_accumulation
from loraforge.train_launch import CPU_OVERRIDE_ENV, LaunchError, check_gpus, torchrun_command
from loraforge.train_monitor import fingerprint


def validated(**overrides) -> dict:
    return lfconfig.validate(small_config(**overrides))


# ---------------------------------------------------------------------------------------------
# the setting, its effective-batch rule and what the job requests


def test_gpus_defaults_to_one_and_must_be_positive():
    cfg = validated()
    assert lfconfig.model_settings(cfg, "tiny")["train"]["gpus"] == 1
    with pytest.raises(lfconfig.ConfigError) as e:
        validated(models={"tiny": {"train": {"gpus": 0}}})
    assert "models.tiny.train.gpus:" in str(e.value)


def test_accumulation_that_gpus_does_not_divide_is_refused_naming_the_field():
    with pytest.raises(lfconfig.ConfigError) as e:
        validated(models={"tiny": {"train": {"gpus": 3, "gradient_accumulation_steps": 8}}})
    message = str(e.value)
    assert "models.tiny.train.gradient_accumulation_steps: 8 is not a multiple of models.tiny.train.gpus (3)" in message
    assert "effective batch" in message
    # the article's 2 x 8 = 16 on 1, 2, 4 or 8 GPUs: 8, 4, 2 or 1 accumulation steps per process
    assert [accumulation_per_process(8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]


def test_a_launch_with_another_process_count_than_train_gpus_is_refused():
    assert per_process_accumulation({"gpus": 2, "gradient_accumulation_steps": 8}, 2) == 4
    with pytest.raises(DistributedConfigError, match="train.gpus: 2, but this training runs as 3 processes"):
        per_process_accumulation({"gpus": 2, "gradient_accumulation_steps": 8}, 3)


def test_the_training_job_requests_gpus_on_one_node_and_a_thread_per_process():
    cfg = validated(models={"8b": {"train": {"gpus": 2}, "resources": {"train_adapter": {"gpu": 2}}},
                            "30b": {"train": {"gpus": 4}, "resources": {"train_adapter": {"gpu": 4}}},
                            "tiny": {"train": {"gpus": 4, "gradient_accumulation_steps": 4}}})
    assert R.job_request(cfg, "train_adapter", "8b")["gpu"] == 2
    assert R.job_request(cfg, "train_adapter", "8b")["nodes"] == 1  # Slurm --nodes=1: one host
    assert R.job_request(cfg, "train_adapter", "8b")["threads"] == 8  # its own threads: 8 >= 2
    assert R.job_request(cfg, "train_adapter", "30b")["gpu"] == 4
    tiny = R.job_request(cfg, "train_adapter", "tiny")
    assert tiny["gpu"] == 4 and tiny["threads"] == 4  # 2 configured, raised to one per process
    # one GPU: nothing changes (no nodes, gpu only where declared)
    one = R.job_request(cfg, "train_adapter", "tiny-moe")
    assert "gpu" not in one and "nodes" not in one and one["threads"] == 2
    assert "nodes" not in R.job_request(cfg, "merge_adapter", "8b")


def test_a_declared_gpu_count_that_contradicts_train_gpus_is_refused():
    with pytest.raises(lfconfig.ConfigError) as e:
        validated(models={"8b": {"train": {"gpus": 2}}})  # config.yaml declares gpu: 1 for the 8b's training
    assert "models.8b.resources.train_adapter.gpu: 1 GPUs, but models.8b.train.gpus is 2" in str(e.value)


def test_gpus_is_no_training_setting_but_checkpoints_resume_only_with_the_same_gpus(tmp_path):
    """Changing gpus keeps the effective batch, schedule and step count: the adapter guard and
    Snakemake's params ignore it (no retrain); a checkpoint holds per-process RNG states and a
    data position counted in per-process batches, so it is resumed only with the same gpus."""
    one = validated()
    two = validated(models={"tiny": {"train": {"gpus": 2, "gradient_accumulation_steps": 2}}})
    one["models"]["tiny"]["train"]["gradient_accumulation_steps"] = 2
    assert training_record.current_settings(one, "tiny", with_base=False) == \
        training_record.current_settings(two, "tiny", with_base=False)
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    t1, t2 = (lfconfig.model_settings(c, "tiny")["train"] for c in (one, two))
    lora = lfconfig.model_settings(one, "tiny")["lora"]
    base = {"layout": "same base", "weights": {"model.safetensors": "0" * 64}}
    assert fingerprint(base, data, lora, t1, "trl") != fingerprint(base, data, lora, t2, "trl")


def test_vram_plan_is_per_gpu_with_ddp_gradient_buckets():
    cfg = validated()
    arch, s = cfg["models"]["8b"]["arch"], lfconfig.model_settings(cfg, "8b")
    one = vram.estimate(arch, s["lora"], s["train"], "unsloth")
    two = vram.estimate(arch, s["lora"], {**s["train"], "gpus": 2}, "unsloth")
    # each GPU holds a full replica and its own micro-batch, plus DDP's fp32 copy of the LoRA gradients
    assert two.allocated == pytest.approx(one.allocated + one.trainable_parameters * 4)
    assert "per GPU, on each of 2 GPUs" in two.describe() and "DDP buckets" in two.describe()
    assert "DDP" not in one.describe()


def test_more_gpus_than_visible_is_refused_unless_the_cpu_test_override_is_set():
    with pytest.raises(LaunchError, match="train.gpus: 2 data-parallel processes need 2 CUDA GPUs on this host, 1 visible"):
        check_gpus(2, visible=1, on_cpu=False)
    check_gpus(2, visible=2, on_cpu=False)
    check_gpus(2, visible=0, on_cpu=True)
    check_gpus(1, visible=0, on_cpu=False)  # one process: CPU or GPU, as before


def test_launched_with_torchrun_on_one_host():
    command = torchrun_command(2, "/x/launch.json")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in command and command[command.index("--nproc-per-node") + 1] == "2"
    assert command[-3:] == ["-m", "loraforge.train_launch", "/x/launch.json"]


@pytest.mark.slow
def test_snakemake_schedules_the_training_with_its_gpus_on_one_node(tmp_path):
    from test_resources import declared_resources

    write_config(tmp_path, small_config(models={"tiny": {"train": {"gpus": 2, "gradient_accumulation_steps": 2}}}))
    run = run_snakemake(tmp_path, "-n", "results/tiny/adapter")
    train = declared_resources(run.stdout + run.stderr)["train_adapter[model=tiny]"]
    assert (train["gpu"], train["nodes"], train["threads"]) == ("2", "1", "2")


# ---------------------------------------------------------------------------------------------
# 2 gloo processes vs 1 process, through the real rule

# Max abs difference allowed between the two adapters' weights. 1 process accumulating 2
# micro-batches sums their gradients, g0 + g1; 2 DDP processes each compute one micro-batch's
# gradient, scaled by 2 (transformers divides the loss by the token count of the whole global
# batch and multiplies it by the process count, since DDP averages), and the all-reduce averages
# them: (2 g0 + 2 g1) / 2. Scaling by 2 is exact in binary floating point and a sum of two terms
# does not depend on their order, so the adapters are expected to be bit-identical: the bound
# leaves room only for a platform whose reduction differs in the last bits. Both runs see the same
# micro-batches in the same order: accelerate shards the one seeded sampler's batches across the
# processes (batch 2k to rank 0, 2k+1 to rank 1), which are the single process's accumulation
# window k, and the micro-batch size stays per_device_batch_size (the same packed rows, so no
# difference in what attends to what).
ADAPTER_TOLERANCE = 1e-6
# Every token (assistant_only_loss off): with the answers-only mask, 4 steps at 1e-3 barely move
# lora_B here, and a resumed 2-process run came out 5.5e-6 (max abs) from the uninterrupted one
# instead of bit-identical (cause not traced; README "Several GPUs").
TRAIN = {"max_seq_length": 64, "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4,
         "learning_rate": 1e-3, "save_steps": 2, "eval_steps": 0, "assistant_only_loss": False}


def _ddp_config(base: Path, gpus_two: int = 2) -> dict:
    models = {key: {"base": {"path": str(base)}, "lora": {"r": 4, "alpha": 8}, "train": {**TRAIN, "gpus": gpus}}
              for key, gpus in (("tiny-one", 1), ("tiny-two", gpus_two))}
    cfg = small_config(targets=["tiny-one", "tiny-two"])
    cfg["models"] = models  # only these two
    cfg.pop("continue", None)  # it names the shipped 30b and 3b
    return cfg


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(path: Path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.fixture(scope="module")
def ddp_pair(tiny_bases, tmp_path_factory):
    """One real Snakemake run training the same model twice: tiny-one in one process
    (accumulation 2), tiny-two as 2 gloo processes (accumulation 1 each)."""
    workdir = tmp_path_factory.mktemp("ddp")
    write_config(workdir, _ddp_config(tiny_bases["qwen3"]))
    env = {CPU_OVERRIDE_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        started = time.time()
        run_snakemake(workdir, "results/tiny-one/adapter", "results/tiny-two/adapter")
        seconds = time.time() - started
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return workdir, seconds


@pytest.mark.slow
def test_two_gloo_processes_train_the_adapter_one_process_trains(ddp_pair):
    workdir, seconds = ddp_pair
    one, two = workdir / "results" / "tiny-one", workdir / "results" / "tiny-two"
    # the same prepared data (the same data settings)
    assert (one / "data" / "train.jsonl").read_bytes() == (two / "data" / "train.jsonl").read_bytes()

    m1, m2 = (json.loads((d / "train" / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m1["gradient_accumulation_steps_per_process"]) == (1, 2)
    assert (m2["processes"], m2["gradient_accumulation_steps_per_process"]) == (2, 1)
    assert m1["steps"] == m2["steps"] == 4

    a1, a2 = _adapter(one / "adapter"), _adapter(two / "adapter")
    diff = max_abs_diff(a1, a2)
    print(f"max abs diff of adapter weights, 1 process x 2 accumulation vs 2 gloo processes x 1: {diff:.3g} "
          f"(largest weight {max(float(t.abs().max()) for t in a1.values()):.3g}; run {seconds:.0f} s)")
    assert diff <= ADAPTER_TOLERANCE
    assert any(float(t.abs().max()) > 1e-3 for k, t in a2.items() if "lora_B" in k)  # it really trained
    assert _losses(one / "train" / "loss.csv") == pytest.approx(_losses(two / "train" / "loss.csv"), rel=1e-5)
    # evaluation is sharded across the processes too and its average is weighted differently when
    # the validation rows do not split evenly (0.06% apart here): close, not equal
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], rel=1e-2)

    # rank 0 alone wrote the reports and the adapter, atomically; checkpoints (saved at step 2 with
    # both ranks' RNG states) are gone once the adapter is in place; nothing of the launch is left
    log = (workdir / "logs" / "tiny-two" / "train_adapter.log").read_text()
    assert "launching 2 data-parallel training processes" in log and "gloo" in log
    assert "[rank 0]" in log and "step 4/4" in log
    assert "[rank 1] loraforge.train_monitor" not in log  # one progress report, not two
    for d in (one, two):
        assert not (d / "train" / "checkpoints").exists() and not (d / "adapter.partial").exists()
    assert not (two / "train" / "launch.json").exists()

    # the adapters record the same settings: gpus is not one of them
    assert training_record.read(one / "adapter") == training_record.read(two / "adapter")


@pytest.mark.slow
def test_changing_gpus_does_not_retrain(ddp_pair, tmp_path):
    """tiny-one retold to use 2 GPUs: same effective batch, so nothing is stale (a dry run)."""
    workdir, _ = ddp_pair
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["models"]["tiny-one"]["train"]["gpus"] = 2
    write_config(workdir, cfg)
    try:
        run = run_snakemake(workdir, "-n", "results/tiny-one/adapter")
    finally:
        cfg["models"]["tiny-one"]["train"]["gpus"] = 1
        write_config(workdir, cfg)
    assert "train_adapter" not in run.stdout + run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr


RESUME_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from loraforge.train_launch import run_training
a = json.loads(sys.argv[1])
m = run_training(a["base"], a["train"], a["validation"], adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
                 train_params=a["train_params"], threads=2)
print("METRICS", json.dumps({k: m[k] for k in ("steps", "resumed_from_step", "processes")}))
"""


def _spawn_ddp(args: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), CPU_OVERRIDE_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-c", RESUME_CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _processes_using(path: Path) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_two_processes_killed_mid_run_resume_to_the_same_adapter(ddp_pair, tiny_bases, tmp_path):
    """SIGKILL the training's launcher once 2 gloo processes saved a checkpoint: torchrun and both
    ranks die with it (nothing goes on writing), and the rerun resumes from the checkpoint (both
    ranks' RNG states) to the adapter the uninterrupted runs trained."""
    workdir, _ = ddp_pair
    cfg = lfconfig.validate(yaml.safe_load((workdir / "config.yaml").read_text()))
    s = lfconfig.model_settings(cfg, "tiny-two")
    data = workdir / "results" / "tiny-two" / "data"
    args = {"base": str(tiny_bases["qwen3"]), "train": str(data / "train.jsonl"),
            "validation": str(data / "validation.jsonl"), "adapter": str(tmp_path / "adapter"),
            "out": str(tmp_path / "train"), "lora": s["lora"],
            "train_params": {**s["train"], "save_steps": 1}}  # save_steps does not change the training
    checkpoints = tmp_path / "train" / "checkpoints"
    proc = _spawn_ddp(args)
    deadline = time.time() + 600
    while not (checkpoints / "checkpoint-1" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 30
    while _processes_using(tmp_path) and time.time() < deadline:  # the kernel delivers the parent-death kills
        time.sleep(0.2)
    assert _processes_using(tmp_path) == []
    assert not (tmp_path / "adapter").exists()

    rerun = _spawn_ddp(args)
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out[-4000:]
    metrics = json.loads(next(line for line in out.splitlines() if line.startswith("METRICS "))[len("METRICS "):])
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert metrics["resumed_from_step"] in (1, 2, 3), out[-3000:]
    assert "resuming from" in out
    resumed = _adapter(tmp_path / "adapter")
    assert max_abs_diff(resumed, _adapter(workdir / "results" / "tiny-two" / "adapter")) <= ADAPTER_TOLERANCE
    assert max_abs_diff(resumed, _adapter(workdir / "results" / "tiny-one" / "adapter")) <= ADAPTER_TOLERANCE
    assert not checkpoints.exists()


# ---------------------------------------------------------------------------------------------
# the scaling benchmark's arguments and arithmetic (its runs need GPUs; --cpu-smoke runs it on CPU)


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_scaling

    return gpu_scaling


def test_scaling_bench_keeps_the_effective_batch_and_computes_efficiency():
    bench = _bench()
    args = bench.parse_args(["--shapes", "8b,30b", "--gpus", "1,2"])
    assert (args.batch, args.accum, args.seq, args.vocab) == (2, 8, 8192, 151936)
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpus", "1,3"])  # 8 accumulation steps cannot be split over 3 GPUs
    smoke = bench.parse_args(["--cpu-smoke"])
    assert smoke.shapes == "tiny" and smoke.accum == 2 and smoke.seq <= 256

    row = {"shape": "8b", "layers": 36, "backend": "unsloth", "load_in_4bit": True, "seq": 8192, "batch": 2,
           "accum": 8, "s_per_step": 16.0, "peak_gib_per_gpu": [9.3], "planned_gib_per_gpu": 9.3}
    one = {**row, "gpus": 1, "accum_per_process": 8, "tokens_per_s": 8000}
    two = {**row, "gpus": 2, "accum_per_process": 4, "tokens_per_s": 14400, "s_per_step": 8.9,
           "peak_gib_per_gpu": [9.5, 9.4]}
    scaled = {r["gpus"]: r for r in bench.with_scaling([one, two])}
    assert scaled[2]["speedup"] == pytest.approx(1.8) and scaled[2]["efficiency"] == pytest.approx(0.9)
    assert scaled[1]["efficiency"] == 1.0
    table = bench.table([one, two])
    assert "| 2 | 2 x 4 x 2 |" in table and "1.80x" in table and "90%" in table and "9.5 / 9.4" in table
