"""Fault injection against the real `qrl-train`: random kill -9s (some during a checkpoint save), engine-core kills,
a corrupted checkpoint and an injected NaN; after each fault the same command is rerun and resumes. The run must
end with the metrics (but wall-clock ones) and final weights of an uninterrupted run of the same config.

    .venv/bin/python bench/faults.py [--kills 10] [--kills-in-save 3] [--engine-kills 2] [--steps 12] [--seed 0]

The NaN: rewards are the arithmetic task's exact match through the plug-in ``fault_rewards:huge_for_answer``
(tests/fault_rewards.py), but so large (3e38) that the group mean overflows and the advantages turn NaN for the
problems whose answer occurs in exactly one step of the seeded prompt stream (chosen here by replaying the stream),
so both runs skip that step's update. ``trainer.save_every=1``: a kill loses
at most the step in flight. Prints a table and writes JSON (bench/results/faults.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

from qrl_megatron.config import load_config  # noqa: E402
from qrl_megatron.data.loader import load_task  # noqa: E402
from qrl_megatron.learner.resume import CheckpointStore  # noqa: E402
from qrl_megatron.models.base import load_hf_weights  # noqa: E402
from qrl_megatron.rollout.stage import PromptSampler  # noqa: E402

WALL_CLOCK = ("time", "seconds", "per_s", "gbps")


def overrides(run_dir: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"run.dir={run_dir}", f"run.cache_dir={cache}", "run.progress=false", "task.num_train=600",
        "warmstart.steps=40", "rollout.prompts_per_step=8", "algo.dynamic_sampling=false",
        f"trainer.max_steps={steps}", "trainer.save_every=1", "trainer.keep_checkpoints=2",
        "trainer.checkpoint=false", "reward.fn=fault_rewards:huge_for_answer",
    ]  # fmt: skip


def nan_answer(steps: int) -> tuple[str, int]:
    """An answer that occurs in exactly one step of the prompt stream (replayed with the trainer's own sampler)."""
    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides(Path("x"), Path("x"), steps))
    task = load_task(cfg.task, cfg.seed, verbose=False)
    sampler = PromptSampler(list(task["train"]["prompt"]), list(task["train"]["answer"]), cfg.seed)
    per_step = [set(sampler.take(cfg.rollout.prompts_per_step)[1]) for _ in range(steps)]
    counts = Counter(answer for answers in per_step for answer in answers)
    for step in range(steps // 3, steps):  # not the first steps: the fault should meet a resumed run
        unique = sorted(a for a in per_step[step] if counts[a] == 1)
        if unique:
            return unique[0], step + 1
    raise SystemExit("no answer occurs in exactly one step; use more --steps")


def deterministic_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(w in k for w in WALL_CLOCK)} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported policy in ``run.dir/final/``, read by the loader the trainer uses (index, every shard)."""
    return dict(load_hf_weights(run_dir / "final"))


def logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def engine_core(pid: int) -> psutil.Process | None:
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name():
                return child
    return None


def wait_until(predicate, process: subprocess.Popen, timeout: float = 600) -> bool:
    """True once ``predicate()`` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kill -9 of the trainer at random moments")
    parser.add_argument("--kills-in-save", type=int, default=3, help="of those, how many wait for a save in flight")
    parser.add_argument("--engine-kills", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qrl-faults-"))
    cache = work / "cache"
    answer, nan_step = nan_answer(args.steps)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "QRL_FAULT_NAN_ANSWER": answer}
    base = [sys.executable, "-m", "qrl_megatron.cli", "configs/tiny_cpu.yaml"]

    start = time.perf_counter()
    reference = work / "reference"
    subprocess.run(base + overrides(reference, cache, args.steps), cwd=REPO, env=env, check=True, capture_output=True)
    reference_s = time.perf_counter() - start
    skipped_reference = [r["step"] for r in deterministic_rows(reference) if r.get("updates_skipped")]

    run_dir = work / "faulted"
    faults = ["kill-in-save"] * args.kills_in_save + ["kill"] * (args.kills - args.kills_in_save)
    faults += ["engine-kill"] * args.engine_kills + ["corrupt-latest"]
    rng.shuffle(faults)
    events: list[dict] = []
    launches, start = 0, time.perf_counter()
    process: subprocess.Popen | None = None
    rows_at_end: list[int] = []
    launched_at = time.time()
    while True:
        if process is None or process.poll() is not None:
            if process is not None and process.returncode == 0:
                break
            rows_at_end.append(logged(run_dir))  # what the previous launch had logged when it died
            log = (work / f"launch{launches}.log").open("w")
            process = subprocess.Popen(
                base + overrides(run_dir, cache, args.steps), cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            launches += 1
            launched_at = time.time()
        if not faults:
            process.wait()
            continue
        fault = faults.pop()
        before = logged(run_dir)
        if fault == "engine-kill":
            reached = wait_until(
                lambda pid=process.pid, n=before: logged(run_dir) > n and engine_core(pid) is not None, process
            )
            core = engine_core(process.pid) if reached else None
            if core is not None:
                core.kill()
            events.append({"fault": fault, "at_step": logged(run_dir), "hit": core is not None})
            continue  # the same trainer goes on: it must restart its engine itself
        if fault == "corrupt-latest":
            store = CheckpointStore(run_dir / "checkpoints")
            last = max(store.steps(), default=0)

            # a checkpoint sealed by this launch, with a good predecessor for the resume to fall back to
            def sealed(store: CheckpointStore = store, last: int = last) -> bool:
                steps = store.steps()
                return len(steps) >= 2 and steps[-1] > last

            reached = wait_until(sealed, process)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if len(store.steps()) < 2:
                events.append({"fault": fault, "at_step": logged(run_dir), "hit": False})
                continue
            newest = store.path(store.steps()[-1])
            victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
            events.append({"fault": fault, "at_step": logged(run_dir), "checkpoint": newest.name, "hit": reached})
            continue
        if fault == "kill-in-save":
            # a save of this launch in flight: a .partial folder newer than the launch (not an earlier kill's leftover)
            def in_save(since: float = launched_at) -> bool:
                folders = (run_dir / "checkpoints").glob("*.partial")
                return any(p.stat().st_mtime > since for p in folders if p.exists())

            reached = wait_until(in_save, process)
        else:
            reached = wait_until(lambda: False, process, timeout=rng.uniform(5.0, 45.0)) or process.poll() is None
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        events.append({"fault": fault, "at_step": logged(run_dir), "hit": reached})
    faulted_s = time.perf_counter() - start

    logs = [(work / f"launch{i}.log").read_text() for i in range(launches)]
    resumed = sum("resuming from" in text for text in logs)
    restarts = sum(text.count("restarting the engine") for text in logs)
    skipped_corrupt = sum(text.count("skipping checkpoint") for text in logs)
    rows, ref_rows = deterministic_rows(run_dir), deterministic_rows(reference)
    ref_w, w = final_weights(reference), final_weights(run_dir)
    weights_equal = bool(ref_w) and ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    # steps lost to a fault: logged by a launch that died, but past the checkpoint the next launch resumed from
    resumed_at = [int(m.group(1)) if (m := re.search(r"resuming from \S+ \(step (\d+)\)", t)) else 0 for t in logs]
    lost = [max(0, rows_at_end[i] - resumed_at[i]) for i in range(1, launches)]
    summary = {
        "steps": args.steps,
        "faults": dict(Counter(e["fault"] for e in events)),
        "faults_that_hit": sum(bool(e["hit"]) for e in events),
        "launches": launches,
        "runs_resumed": resumed,
        "engine_restarts": restarts,
        "corrupt_checkpoints_skipped": skipped_corrupt,
        "nan_step": nan_step,
        "nan_steps_skipped_reference": skipped_reference,
        "nan_steps_skipped_faulted": [r["step"] for r in rows if r.get("updates_skipped")],
        "metrics_rows": len(rows),
        "metrics_equal": rows == ref_rows,
        "final_weights_equal": weights_equal,
        "reference_s": reference_s,
        "faulted_s": faulted_s,
        "steps_lost_per_relaunch": lost,
        "events": events,
    }
    print(f"{'fault':<16} {'count':>5} {'hit':>4}")
    for fault, count in summary["faults"].items():
        hit = sum(bool(e["hit"]) for e in events if e["fault"] == fault)
        print(f"{fault:<16} {count:>5} {hit:>4}")
    print(
        f"launches {launches}, resumed {resumed}, engine restarts {restarts}, corrupt checkpoints skipped "
        f"{skipped_corrupt}, steps lost {sum(lost)} (at most {max(lost, default=0)} per relaunch), NaN step {nan_step} skipped (reference {skipped_reference}, faulted "
        f"{summary['nan_steps_skipped_faulted']})"
    )
    print(
        f"metrics rows {len(rows)}/{args.steps}, equal to the uninterrupted run: {summary['metrics_equal']}; "
        f"final weights equal: {weights_equal}; {reference_s:.0f} s uninterrupted vs {faulted_s:.0f} s with faults"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"JSON: {args.out}; logs in {work}")
    sys.exit(0 if summary["metrics_equal"] and weights_equal and len(rows) == args.steps else 1)


if __name__ == "__main__":
    main()
