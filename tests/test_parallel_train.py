"""Multi-process training (`torchrun -m moekit train --set parallel.ep=P`) against one process.

The reference is one in-process Trainer with batch_size W*B; a W-rank run with batch_size B reads
the same global batches (rank r: rows r*B .. r*B+B-1), so its losses (cross-entropy, balance loss
with coefficient 0.1, z-loss, gradient norm, dropped fraction, validation loss) must equal the
reference's, token drops at capacity 1.0 included (expert parallelism decides them on the EP
group's concatenated batch; the balance loss is the whole batch's on every rank). The runs are in
float64 (train.dtype): in float32 a near-tie routing decision flips within 20 steps. Checked,
each job started with the documented entry point (torchrun -m moekit train):

  - world 2, EP 2, grad_accum 2, 20 steps: losses, validation losses, the checkpoint (the
    single-process layout and files, weights, sampler state; per-rank RNG states);
  - world 4, EP 2 (two EP groups), 20 steps without drops (capacity is per EP group);
  - resharding: an EP 2 checkpoint resumed by one process, and a one-process checkpoint resumed by
    world 4 with EP 4 (one expert per rank; an empty evaluation block on rank 3): the continued
    losses equal the reference's;
  - a rank killed mid-run (SIGKILL) makes torchrun exit non-zero within a bounded time, and
    starting the same command again resumes from the last checkpoint and ends like the reference;
    a rank that hangs makes the others fail after parallel.timeout_s (expert-parallel groups too);
    Ctrl-C on one rank (twice, as torchrun forwards it) stops all ranks after that step with a
    checkpoint and the report;
  - a bad layout fails on every rank with the values named.

Every job runs in its own session and is killed with all its workers at a deadline, so a hang
fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.train import Trainer, load_config
from moekit.train import checkpoint as ckpt

STEPS, HALF = 20, 10  # the reference saves at HALF; the fault kills a rank after HALF + 3 steps
TOL = 1e-4
JOB_TIMEOUT = 240.0  # seconds for one torchrun job on two loaded cores (they take ~15-40 s)
COLLECTIVE_TIMEOUT = 30  # parallel.timeout_s of the jobs
FAULT = Path(__file__).with_name("parallel_train_fault.py")


# ---------------------------------------------------------------------- jobs


def overrides(root: Path, run: str, **extra: str) -> list[str]:
    """A tiny decoder (4 experts, top-2, capacity 1.0) on a small corpus; `root` holds the corpus."""
    base = {
        "data.paths": f'["{root}/corpus/*.txt"]',
        "data.validation_paths": f'["{root}/corpus/val/*.txt"]',
        "data.cache_dir": f'"{root / "cache"}"',
        "data.vocab_size": "300",
        "data.seq_len": "32",
        "data.batch_size": "8",  # the reference's global batch; a W-rank job passes 8 / W
        "data.eval_batch_size": "3",  # 4 ranks: blocks of 1, 1, 1 and 0 rows
        "model.dim": "32",
        "model.n_layers": "2",
        "model.n_heads": "4",
        "model.n_kv_heads": "2",
        "model.ffn_hidden_dim": "64",
        "model.max_seq_len": "64",
        "moe.num_experts": "4",
        "moe.hidden_dim": "32",
        "moe.capacity_factor": "1.0",
        "moe.load_balance_coef": "0.1",
        "moe.z_loss_coef": "0.001",
        "train.steps": str(STEPS),
        "train.grad_accum": "2",
        "train.lr": "1e-2",
        "train.warmup_steps": "5",
        "train.log_every": "1",
        "train.eval_every": str(HALF),
        "train.eval_batches": "2",
        "train.save_every": str(HALF),
        "train.out_dir": f'"{root / "runs"}"',
        "train.run_name": f'"{run}"',
        "train.progress": "false",
        "train.threads": "1",  # as torchrun's workers; torch's default threads crawl on loaded cores
        # float32 differences of summation order (1e-7) flip a near-tie top-k or capacity decision
        # within 20 steps, after which the runs drift apart; float64 keeps every decision the same
        "train.dtype": '"float64"',
        "parallel.timeout_s": str(COLLECTIVE_TIMEOUT),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def torchrun(world: int, args: list[str], script: Path | None = None, env: dict | None = None):
    """(exit code, output, seconds) of `torchrun --standalone --nproc-per-node world -m moekit train`
    (or `script train`); the job and its workers are killed at JOB_TIMEOUT."""
    target = [str(script)] if script else ["-m", "moekit"]
    sets = [x for a in args for x in ("--set", a)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd += [*target, "train", *sets]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: torchrun and its workers are killed together
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {JOB_TIMEOUT}s (hang?):\n{output[-3000:]}")
    return proc.returncode, output, time.monotonic() - start


def logged(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step (the training lines and the evaluation lines merged)."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


def assert_losses_match(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    assert sorted(s for s in got if "loss" in got[s]) == list(steps)
    for step in steps:
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "dropped_fraction", "val_loss"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) < TOL, (
                    step,
                    key,
                    got[step][key],
                    want[step][key],
                )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """The in-process runs set torch's thread count (train.threads); other modules get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small corpus (stdlib modules as text files); the data cache is filled by the reference."""
    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("ptrain")
    (out / "corpus" / "val").mkdir(parents=True)
    files = sorted(p for p in src.glob("*.py") if p.stat().st_size > 2000)[:45]
    for i, p in enumerate(files):
        shutil.copy(p, out / "corpus" / ("val" if i % 9 == 0 else ".") / (p.stem + ".txt"))
    return out


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """One process, batch 8, STEPS steps; its checkpoint of step HALF is kept as ref-half."""
    trainer = Trainer(load_config(None, overrides(root, "ref")))
    save = trainer.save

    def save_and_keep_half() -> Path:
        path = save()
        if trainer.step == HALF:
            shutil.copytree(path, root / "ref-half")
        return path

    trainer.save = save_and_keep_half
    trainer.fit()
    return {"metrics": logged(trainer.run_dir), "checkpoint": trainer.ckpt_dir, "half": root / "ref-half"}


@pytest.fixture(scope="module")
def reference_no_drops(root) -> dict:
    """One process as `reference` with capacity factor 2.0: with 4 experts and top-2 every expert
    has a slot for every token, so no assignment is dropped whatever the batching."""
    trainer = Trainer(load_config(None, overrides(root, "ref-cf2", **{"moe.capacity_factor": "2.0"})))
    trainer.fit()
    return {"metrics": logged(trainer.run_dir)}


@pytest.fixture(scope="module")
def killed(root, reference) -> dict:
    """World 2, EP 2; rank 1 dies (SIGKILL) before step HALF + 4. Its last checkpoint (step HALF,
    written under EP 2) is copied aside before anything resumes from it."""
    args = overrides(root, "fault", **{"data.batch_size": "4", "parallel.ep": "2"})
    rc, output, seconds = torchrun(
        2, args, FAULT, env={"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": str(HALF + 3)}
    )
    copy = root / "ep2-half"
    if (root / "runs" / "fault" / "checkpoint").is_dir():
        shutil.copytree(root / "runs" / "fault" / "checkpoint", copy)
    return {"rc": rc, "output": output, "seconds": seconds, "args": args, "checkpoint": copy}


# ---------------------------------------------------------------------- tests


def test_world2_ep2_matches_one_process(root, reference):
    args = overrides(root, "w2", **{"data.batch_size": "4", "parallel.ep": "2"})
    rc, output, _ = torchrun(2, args)
    assert rc == 0, output[-3000:]
    assert output.count("validation loss") == 1, output[-3000:]  # rank 0 alone prints the summary
    assert "data parallel: ddp" in output  # the default: DistributedDataParallel
    run = root / "runs" / "w2"
    assert_losses_match(logged(run), reference["metrics"], range(1, STEPS + 1))
    assert any(r.get("dropped_fraction", 0) > 0 for r in reference["metrics"].values())  # capacity drops

    # The checkpoint has the single-process layout: the same files, keys, shapes and tied weights.
    ours, ref = run / "checkpoint", reference["checkpoint"]
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    config = json.loads((ours / ckpt.CONFIG_FILE).read_text())
    assert config["tied"] == {"output.weight": "tok_embeddings.weight"}
    # its run is the one-process run that continues it (what moekit eval or finetune rebuild)
    assert (config["run"]["data"]["batch_size"], config["run"]["parallel"]["ep"]) == (8, 1)
    model, want = ckpt.read_safetensors(ours / ckpt.MODEL_FILE), ckpt.read_safetensors(ref / ckpt.MODEL_FILE)
    assert set(model) == set(want)
    for key in want:
        assert model[key].shape == want[key].shape, key
        assert (model[key] - want[key]).abs().max() < TOL, key
    state = json.loads((ours / ckpt.STATE_FILE).read_text())
    ref_state = json.loads((ref / ckpt.STATE_FILE).read_text())
    assert state["sampler"] == ref_state["sampler"]  # the global batch's data position
    assert (state["step"], state["tokens_seen"], state["world_size"], state["ep"]) == (
        STEPS,
        ref_state["tokens_seen"],
        2,
        2,
    )
    tensors = ckpt.read_safetensors(ours / ckpt.OPTIMIZER_FILE)
    optimizer = {k: v for k, v in tensors.items() if k.startswith("state.")}
    ref_optimizer = {
        k: v for k, v in ckpt.read_safetensors(ref / ckpt.OPTIMIZER_FILE).items() if k.startswith("state.")
    }
    assert {k: v.shape for k, v in optimizer.items()} == {k: v.shape for k, v in ref_optimizer.items()}
    assert not torch.equal(tensors["rng.rank0.torch"], tensors["rng.rank1.torch"])  # per-rank streams
    assert cli_main(["eval", "--ckpt", str(ours), "--batches", "2"]) == 0  # one process reads it


def test_allreduce_data_parallel_matches_one_process(root, reference):
    """The same world 2 / EP 2 run with parallel.data_parallel=allreduce (one flat all-reduce after
    the backward instead of DistributedDataParallel) logs the same 20 steps as one process."""
    args = overrides(
        root,
        "w2-allreduce",
        **{"data.batch_size": "4", "parallel.ep": "2", "parallel.data_parallel": "allreduce"},
    )
    rc, output, _ = torchrun(2, args)
    assert rc == 0, output[-3000:]
    assert "data parallel: allreduce" in output
    assert_losses_match(logged(root / "runs" / "w2-allreduce"), reference["metrics"], range(1, STEPS + 1))


def test_world4_ep2_matches_one_process(root, reference_no_drops):
    """EP 2 < world 4: two EP groups, expert gradients reduced over the expert-data-parallel pairs,
    the balance loss over all four ranks. Capacity is decided per EP group, so this run keeps
    every assignment (capacity factor 2.0), as the one-process reference does."""
    args = overrides(
        root, "w4-ep2", **{"data.batch_size": "2", "parallel.ep": "2", "moe.capacity_factor": "2.0"}
    )
    rc, output, _ = torchrun(4, args)
    assert rc == 0, output[-3000:]
    assert_losses_match(logged(root / "runs" / "w4-ep2"), reference_no_drops["metrics"], range(1, STEPS + 1))
    assert all(r.get("dropped_fraction", 0) == 0 for r in reference_no_drops["metrics"].values())


def test_ep2_checkpoint_resumes_in_one_process(root, reference, killed):
    assert (killed["checkpoint"] / ckpt.CONFIG_FILE).is_file(), killed["output"][-3000:]
    assert json.loads((killed["checkpoint"] / ckpt.STATE_FILE).read_text())["step"] == HALF
    shutil.copytree(killed["checkpoint"], root / "runs" / "ep2-to-1" / "checkpoint")
    resumed = Trainer(load_config(None, overrides(root, "ep2-to-1")))
    result = resumed.fit()
    assert resumed.step == STEPS and len(result.train_losses) == STEPS - HALF
    assert_losses_match(logged(resumed.run_dir), reference["metrics"], range(HALF + 1, STEPS + 1))


def test_one_process_checkpoint_resumes_in_world4_ep4(root, reference):
    shutil.copytree(reference["half"], root / "runs" / "1-to-ep4" / "checkpoint")
    args = overrides(root, "1-to-ep4", **{"data.batch_size": "2", "parallel.ep": "4"})
    rc, output, _ = torchrun(4, args)
    assert rc == 0, output[-3000:]
    assert_losses_match(logged(root / "runs" / "1-to-ep4"), reference["metrics"], range(HALF + 1, STEPS + 1))


def test_killed_rank_fails_the_job_and_a_restart_resumes(root, reference, killed):
    assert killed["rc"] != 0, killed["output"][-3000:]
    assert "-9" in killed["output"] or "SIGKILL" in killed["output"], killed["output"][-3000:]
    assert killed["seconds"] < JOB_TIMEOUT - 60  # bounded: torchrun noticed and stopped the other rank
    run = root / "runs" / "fault"
    assert max(logged(run)) > HALF  # it had trained past the checkpoint: those steps are redone
    rc, output, _ = torchrun(2, killed["args"])  # the same command again
    assert rc == 0, output[-3000:]
    assert_losses_match(logged(run), reference["metrics"], range(1, STEPS + 1))  # each step once


def test_hung_rank_times_out(root, reference):
    timeout_s = 5
    args = overrides(
        root, "hang", **{"data.batch_size": "4", "parallel.ep": "2", "parallel.timeout_s": str(timeout_s)}
    )
    rc, output, seconds = torchrun(
        2, args, FAULT, env={"FAULT": "hang", "FAULT_RANK": "1", "FAULT_STEP": "2"}
    )
    assert rc != 0, output[-3000:]
    assert f"Timed out waiting {timeout_s * 1000}ms" in output, output[-3000:]
    assert seconds < JOB_TIMEOUT - 60, output[-3000:]


def test_ctrl_c_on_one_rank_stops_all_with_a_checkpoint(root, reference):
    args = overrides(root, "ctrl-c", **{"data.batch_size": "4", "parallel.ep": "2"})
    rc, output, _ = torchrun(2, args, FAULT, env={"FAULT": "interrupt", "FAULT_RANK": "1", "FAULT_STEP": "3"})
    assert rc != 0 and "exitcode  : 130" in output, output[-3000:]  # both ranks exit with 130
    assert output.count("interrupted at step 4: saving a checkpoint") == 1, output[-3000:]
    run = root / "runs" / "ctrl-c"
    assert json.loads((run / "checkpoint" / ckpt.STATE_FILE).read_text())["step"] == 4
    assert (run / "report" / "summary.md").is_file()
    assert_losses_match(logged(run), reference["metrics"], range(1, 5))


def test_bad_layout_fails_on_every_rank(root, reference, capsys):
    rc, output, _ = torchrun(2, overrides(root, "bad", **{"data.batch_size": "4", "parallel.ep": "3"}))
    assert rc != 0
    assert output.count("moekit train: error: parallel.ep=3 does not divide the world size 2") == 2, output[
        -3000:
    ]
    assert "Traceback" not in output.split("moekit train: error")[0]
    # one process: the same check, with how to start several
    assert (
        cli_main(
            ["train", *[x for a in overrides(root, "bad1", **{"parallel.ep": "2"}) for x in ("--set", a)]]
        )
        == 2
    )
    assert "torchrun --nproc-per-node" in capsys.readouterr().err
