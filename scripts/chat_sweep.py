"""The fine-tuning sweep that chose the built-in chat model's settings (docs/finetune.md), made to run on a
GPU machine in one command of a few minutes:

    python scripts/chat_sweep.py --budget 555 --out OUT [--data tok.tar.xz] [--eval eval.tar.xz]

Inputs, made beforehand with babyllama itself (from train-00.txt, `data instruct --val-count 300 --dev-count
200` with the same seed 0 every time, so every set holds out the same stories):
- E12: `--early-words 4 --per-story 12`; C6: `--early-words 4 --per-story 6 --max-word-df 0.2`; A4: `--per-story 4`;
- the data tar: one folder per combination of sets and word weight that RUNS uses (E12_w20, E12+C6_w20,
  E12+C6+A4_w20, E12+C6_w50), each `babyllama data pretokenize --input DIR --tokenizer
  babyllama/assets/tokenizer.bin --max-seq-len 512 --word-weight W` of a DIR holding SET_train.jsonl (each set's
  instruct_train.jsonl) and dev_val.jsonl (E12's instruct_dev.jsonl: the validation split);
- the eval tar: dev_E.jsonl, dev_C.jsonl (E12's and C6's instruct_dev.jsonl), heldout_E.jsonl, heldout_C.jsonl
  (their instruct_val.jsonl).
Steps: unpack; a short probe of every run side by side (the slowest one's time per step); the runs sized to the
time left, all side by side on the one GPU; a copy of each run's checkpoint at every evaluation; export and `eval
--instruct` of every copy on the dev splits (and, recorded only, the held-out ones); then OUT/results.json, the
dev-best checkpoint of each run as an fp32 .bin (three to a tar) and the logs.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "babyllama/assets/model.bin"
TOK = ROOT / "babyllama/assets/tokenizer.bin"
PY = sys.executable
EVAL_EXTRA: list[str] = []

# name -> (data sets, word weight, extra --key=value)
RUNS = {
    "r1_E": (["E12"], 20, []),
    "r2_EC": (["E12", "C6"], 20, []),
    "r3_ECA": (["E12", "C6", "A4"], 20, []),
    "r4_EC_drop": (["E12", "C6"], 20, ["--dropout=0.1"]),
    "r5_EC_lr2": (["E12", "C6"], 20, ["--learning_rate=2e-3", "--min_lr=2e-4"]),
    "r6_EC_w50": (["E12", "C6"], 50, []),
}
COMMON = ["--batch_size=64", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=100", "--weight_decay=0.0",
          "--eval_iters=10", "--seed=1337"]


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


DATA_TAR, EVAL_TAR = ROOT / "gpu/tok.tar.xz", ROOT / "gpu/eval.tar.xz"


def prepare(work: Path, data_tar: Path, eval_tar: Path) -> dict[str, Path]:
    """Unpack the pretokenized folders (one per data sets + word weight, made by `data pretokenize` from the
    jsonl of `data instruct`) and the eval requests."""
    (work / "raw").mkdir(parents=True, exist_ok=True)
    (work / "tok").mkdir(parents=True, exist_ok=True)
    sh(["tar", "-xJf", str(eval_tar), "-C", str(work / "raw")])
    sh(["tar", "-xJf", str(data_tar), "-C", str(work / "tok")])
    dirs = {data_key(n): work / "tok" / data_key(n) for n in RUNS}
    for key, d in dirs.items():
        meta = json.loads((d / "meta.json").read_text())
        sets, w = key.rsplit("_w", 1)
        assert meta["word_weight"] == int(w) and sorted(meta["shards"]["train"]) == sorted(
            f"{s}_train.bin" for s in sets.split("+")), (key, meta)
    log("unpacked", {k: json.loads((d / "meta.json").read_text())["tokens"] for k, d in dirs.items()})
    return dirs


def data_key(name):
    sets, w, _ = RUNS[name]
    return "+".join(sets) + f"_w{w}"


def launch(name, dirs, out_dir, max_iters, eval_interval, device, log_interval):
    sets, w, extra = RUNS[name]
    cmd = [PY, "-m", "babyllama", "finetune", f"--base={BASE}", f"--data_dir={dirs[data_key(name)]}",
           f"--out_dir={out_dir}", f"--word_weight={w}", f"--device={device}", f"--max_iters={max_iters}",
           f"--eval_interval={eval_interval}", f"--log_interval={log_interval}", *COMMON, *extra]
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    (out_dir / "command").write_text(" ".join(cmd[1:]))
    return subprocess.Popen(cmd, stdout=open(out_dir / "train.log", "w"), stderr=subprocess.STDOUT, env=env)


def step_ms(logfile: Path) -> float | None:
    times = re.findall(r"\| ([0-9.]+)ms \|", logfile.read_text())
    return float(times[-1]) if times else None


def probe(dirs, work, device, seconds) -> float:
    """Run every configuration side by side for a while; the slowest one's ms per step."""
    procs = {n: launch(n, dirs, work / "probe" / n, 100000, 100000, device, 20) for n in RUNS}
    deadline = time.time() + seconds
    while time.time() < deadline and all(p.poll() is None for p in procs.values()):
        time.sleep(1)
    for p in procs.values():
        p.kill()
        p.wait()
    ms = {n: step_ms(work / "probe" / n / "train.log") for n in RUNS}
    log("probe ms/step", ms)
    bad = [n for n, v in ms.items() if v is None]
    if bad:
        for n in bad:
            print((work / "probe" / n / "train.log").read_text()[-3000:])
        raise SystemExit(f"probe failed for {bad}")
    return max(ms.values())


def snapshotter(run_dirs: dict[str, Path], stop: threading.Event):
    """Copy each run's ckpt.pt whenever it is rewritten (every evaluation)."""
    seen: dict[str, float] = {}
    while not stop.is_set():
        for n, d in run_dirs.items():
            f = d / "ckpt.pt"
            try:
                m = f.stat().st_mtime
            except FileNotFoundError:
                continue
            if seen.get(n) != m:
                time.sleep(0.5)  # atomic rename: the file is whole once it is there
                k = len(list(d.glob("snap_*.pt")))
                shutil.copy(f, d / f"snap_{k}.pt")
                seen[n] = f.stat().st_mtime
        time.sleep(1)


def score(model: Path, requests: Path) -> dict:
    r = subprocess.run([PY, "-m", "babyllama", "eval", str(model), "--instruct", str(requests), "--json", *EVAL_EXTRA],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        return {"error": r.stderr[-500:]}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    keys = ("word_share", "topic_share", "all_words_share", "finished", "requests", "mean_reply_tokens")
    return {k: d[k] for k in keys if k in d}


def evaluate(work: Path, run_dirs: dict[str, Path], raw: Path) -> dict:
    jobs = []
    for n, d in run_dirs.items():
        for snap in sorted(d.glob("snap_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
            jobs.append((n, snap))

    def one(job):
        n, snap = job
        out = snap.with_suffix(".bin")
        r = subprocess.run([PY, "-m", "babyllama", "export", str(out), "--checkpoint", str(snap), "--version", "1"],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode:
            return n, snap.name, {"error": r.stderr[-500:]}
        import torch
        it = int(torch.load(snap, map_location="cpu", weights_only=False)["iter_num"])
        res = {"iter": it}
        for split in ("dev_E", "dev_C", "heldout_E", "heldout_C"):
            res[split] = score(out, raw / f"{split}.jsonl")
        return n, snap.name, res

    results: dict = {}
    with ThreadPoolExecutor(14) as ex:
        for n, snap, res in ex.map(one, jobs):
            results.setdefault(n, {})[snap] = res
            log(n, snap, json.dumps(res))
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=560, help="seconds for the whole sweep")
    p.add_argument("--data", type=Path, default=DATA_TAR, help="the pretokenized folders (.tar.xz)")
    p.add_argument("--eval", type=Path, default=EVAL_TAR, help="the dev and held-out requests (.tar.xz)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/sweep"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--probe", type=float, default=45)
    p.add_argument("--eval-reserve", type=float, default=110)
    p.add_argument("--max-iters", type=int, default=0, help="fixed iterations (tests of this script)")
    p.add_argument("--runs", default="", help="only these runs (comma-separated; tests of this script)")
    p.add_argument("--extra", default="", help="more --key=value for every run (space-separated)")
    p.add_argument("--max-eval", type=int, default=0, help="score only the first N requests (tests)")
    a = p.parse_args()
    if a.runs:
        for n in set(RUNS) - set(a.runs.split(",")):
            del RUNS[n]
    COMMON.extend(a.extra.split())
    if a.max_eval:
        EVAL_EXTRA.extend(["--max-examples", str(a.max_eval)])
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    dirs = prepare(a.work, a.data, a.eval)
    if a.max_iters:
        iters = a.max_iters
    else:
        ms = probe(dirs, a.work, a.device, a.probe)
        left = a.budget - (time.time() - T0) - a.eval_reserve - 25  # 25 s: start-up and final evaluations
        iters = int(left * 1000 / ms * 0.92) // 100 * 100
    log("iterations per run", iters)
    run_dirs = {n: a.work / "runs" / n for n in RUNS}
    stop = threading.Event()
    snapper = threading.Thread(target=snapshotter, args=(run_dirs, stop), daemon=True)
    snapper.start()
    procs = {n: launch(n, dirs, run_dirs[n], iters, max(iters // 4, 1), a.device, max(iters // 20, 1))
             for n in RUNS}
    hard_deadline = T0 + a.budget - a.eval_reserve + 20
    while any(p.poll() is None for p in procs.values()) and time.time() < hard_deadline:
        time.sleep(2)
    for n, pr in procs.items():
        if pr.poll() is None:
            log(n, "still running at the deadline: killed")
            pr.kill()
        pr.wait()
        log(n, "exit", pr.returncode, "|", (run_dirs[n] / "train.log").read_text().strip().splitlines()[-1][:200])
    time.sleep(2.5)
    stop.set()
    snapper.join()
    results = evaluate(a.work, run_dirs, a.work / "raw")
    (a.out / "results.json").write_text(json.dumps({"iters": iters, "runs": results}, indent=1))
    # the dev-best snapshot of every run (fp32 .bin), three to a tar; logs in another
    best = []
    for n, snaps in results.items():
        ok = {s: r for s, r in snaps.items() if "dev_E" in r and "word_share" in r["dev_E"]}
        if ok:
            s = max(ok, key=lambda s: ok[s]["dev_E"]["word_share"] + ok[s]["dev_C"].get("word_share", 0))
            best.append((n, run_dirs[n] / s.replace(".pt", ".bin")))
    for i in range(0, len(best), 3):
        with tarfile.open(a.out / f"models{i // 3}.tar", "w") as t:
            for n, f in best[i:i + 3]:
                t.add(f, arcname=f"{n}_{f.name}")
    with tarfile.open(a.out / "logs.tar.gz", "w:gz") as t:
        for n, d in run_dirs.items():
            for f in ("train.log", "command", "metrics.jsonl"):
                if (d / f).exists():
                    t.add(d / f, arcname=f"{n}/{f}")
        for f in a.work.glob("pretok_*.log"):
            t.add(f, arcname=f.name)
    log("done")


if __name__ == "__main__":
    main()
