"""Rounds of DAgger on Meta-World from the shipped small pi0: run the current model and let the scripted expert take
over from the states it leads to (`pi0 eval --recover`, HG-DAgger: the expert's own trajectories from a step drawn
per episode, or from where the robot stalls; `--labels state` labels every visited state instead, `--dagger`) ->
fine-tune the current model on the demonstrations and every round's expert data, in the units the model learned
(`--norm-stats checkpoint`) -> evaluate on scene seeds no earlier step used; a table per round.

    .venv/bin/python tools/dagger_rounds.py [--work /tmp/pi0-dagger] [--rounds 2] [--episodes 20] [--steps 1500]
                                            [--eval-episodes 20] [--ship]

Seeds: demonstrations 0..., the shipped model's evaluation 10000..., round r's DAgger episodes 20000 + 1000 r...,
its evaluation 30000 + 1000 r.... The demonstrations are collected as tools/train_metaworld.sh collects them when
WORK/demos is missing. --ship copies the last round's model into pi0/assets/metaworld (with its evaluation report)
when it is at least as good as the shipped one on every task and better on one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pi0" / "assets" / "metaworld"
TASKS = "drawer-open-v3,drawer-close-v3,button-press-topdown-v3,window-open-v3,window-close-v3"


def pi0(*args: str, log: Path) -> dict:
    """A `pi0` command whose --json report is returned; its stderr goes to `log`."""
    cmd = [str(Path(sys.executable).parent / "pi0"), *args]  # the pi0 of the Python running this
    with open(log, "a") as err:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=True).stdout
    return json.loads(out) if out.strip().startswith("{") else {}


def table(name: str, report: dict) -> str:
    rows = [f"{name}: mean {report['mean_success'] * 100:.0f} %"]
    for task, r in report["tasks"].items():
        lo, hi = r["ci95"]
        rows.append(f"  {task:26s} {r['success'] * 100:4.0f} %  ({lo * 100:.0f}-{hi * 100:.0f} %)")
    return "\n".join(rows)


def allocation(report: dict, tasks: list[str], total: int, floor: int) -> dict[str, int]:
    """Episodes a task for a round: `floor` each, the rest in proportion to the task's failures in the last evaluation
    (evenly where it failed nowhere)."""
    fails = {t: 1.0 - report["tasks"][t]["success"] for t in tasks}
    rest = max(0, total - floor * len(tasks))
    if not sum(fails.values()):
        return {t: max(floor, total // len(tasks)) for t in tasks}
    return {t: floor + round(rest * f / sum(fails.values())) for t, f in fails.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/pi0-dagger")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=20, help="DAgger episodes per task and round (on average, "
                    "with --focus)")
    ap.add_argument("--no-focus", dest="focus", action="store_false", help="the same number of DAgger episodes for "
                    "every task (default: 5 each, the rest by each task's failures in the last evaluation)")
    ap.add_argument("--labels", default="recover", choices=["recover", "state"], help="recover: the expert's "
                    "trajectories from the states the policy led to (pi0 eval --recover); state: the expert's action at "
                    "every state the policy visits (pi0 eval --dagger)")
    ap.add_argument("--takeover", type=int, default=10, help="the expert acts where the robot stalled this many steps")
    ap.add_argument("--eval-episodes", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--demos", type=int, default=50, help="demonstrations per task, where WORK/demos is missing")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps a round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ema", type=float, default=None, help="keep and save an exponential moving average of the "
                    "weights with this decay (the shipped model was trained with 0.999)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ship", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    t0 = time.time()
    demos = work / "demos"
    if not (demos / "meta" / "info.json").exists():
        pi0("sim", "collect", "--env", "metaworld", "--tasks", a.tasks, "--episodes", str(a.demos), "--out", str(demos),
            "--image-size", "64", "--noise", "0.3", "--seed", "0", log=log)
    tasks = a.tasks.split(",")
    options = ["--env", "metaworld", "--max-steps", str(a.max_steps), "--dtype", "float32", "--json", "--no-expert"]
    common = ["--tasks", a.tasks, "--workers", str(a.workers)] + options
    current = str(SHIPPED)
    cached = work / "shipped_eval.json"  # the shipped model's evaluation, kept across runs of the script
    if cached.exists() and json.loads(cached.read_text()).get("episodes") == a.eval_episodes * len(a.tasks.split(",")):
        base = json.loads(cached.read_text())
    else:
        base = pi0("eval", *common, "--checkpoint", current, "--episodes", str(a.eval_episodes), "--seed", "30000",
                   log=log)
        cached.write_text(json.dumps(base))
    print(table("shipped model (seeds 30000...)", base), flush=True)
    datasets, labels, rounds = [str(demos)], 0, []
    for r in range(1, a.rounds + 1):
        dagger = work / f"dagger-{r}"
        shutil.rmtree(dagger, ignore_errors=True)  # this round's labels, not appended to an earlier run's
        last = rounds[-1]["eval"] if rounds else base
        share = allocation(last, tasks, a.episodes * len(tasks), min(5, a.episodes)) if a.focus else \
            {t: a.episodes for t in tasks}
        rep = {"episodes": share, "recorded": []}
        for task, n in share.items():  # into one dataset (the recorder appends)
            if n:
                one = pi0("eval", "--tasks", task, "--workers", str(min(a.workers, n)), *options, "--checkpoint",
                          current, "--episodes", str(n), "--seed", str(20000 + 1000 * r), "--record", str(dagger),
                          "--recover" if a.labels == "recover" else "--dagger", "--takeover", str(a.takeover), log=log)
                rep["recorded"].append(one["recorded"])
                labels += one["recorded"]["expert_labels"]
        datasets.append(str(dagger))
        out = work / f"round-{r}"
        shutil.rmtree(out, ignore_errors=True)
        train = ["train", "--init", current, "--out", str(out), "--steps", str(a.steps), "--batch", str(a.batch),
                 "--lr", str(a.lr), "--warmup", str(max(1, a.steps // 30)), "--save-every", str(a.steps), "--quiet",
                 "--dtype", "float32", "--seed", str(r), "--norm-stats", "checkpoint"] + \
            (["--ema", str(a.ema)] if a.ema else [])
        for d in datasets:
            train += ["--dataset", d]
        pi0(*train, log=log)
        current = str(out / "latest")
        ev = pi0("eval", *common, "--checkpoint", current, "--episodes", str(a.eval_episodes), "--seed",
                 str(30000 + 1000 * r), log=log)
        rounds.append({"round": r, "expert_labels_total": labels, "dagger": rep, "eval": ev})
        print(table(f"round {r} ({labels} expert labels so far, DAgger episodes {share}; seeds {30000 + 1000 * r}...)",
                    ev), flush=True)
    summary = {"shipped": base, "rounds": rounds, "seconds": time.time() - t0, "args": vars(a)}
    (work / "rounds.json").write_text(json.dumps(summary, indent=1))
    if a.ship and rounds:
        last = rounds[-1]["eval"]["tasks"]
        better = all(last[t]["success"] >= base["tasks"][t]["success"] for t in last) and \
            any(last[t]["success"] > base["tasks"][t]["success"] for t in last)
        if better:
            for f in Path(current).resolve().iterdir():
                if f.name != "train_state.pt" and f.is_file():
                    shutil.copy2(f, SHIPPED / f.name)
            print(f"shipped {current} into {SHIPPED}", flush=True)
        else:
            print("not shipped: not better on every task", flush=True)
    print(f"{time.time() - t0:.0f} s; report {work / 'rounds.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
