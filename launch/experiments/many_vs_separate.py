"""One launch.train_many job against the same SAEs trained one by one, side by side.

    python -m launch.experiments.many_vs_separate --train DIR --eval DIR
        [--gin_file smollm2_many.gin] [--gin NAME=VALUE ...] [--workdir runs/many_vs_separate]
        [--repeats 1] [--out runs/many_vs_separate/results.md]

Per repeat: the job (`launch.train_many`) in WORKDIR/rR/many, then each of its SAEs alone
(`launch.train --gin_file=WORKDIR/rR/many/<name>/config.gin`) in WORKDIR/rR/separate/<name>,
each a subprocess timed from start to exit. Reports the wall-clock of each, the part of it
that was training (the last `train_seconds` of metrics.jsonl: the steps, the first step's
compilation included, evaluations left out) and the rest (start-up, opening the data,
compiling, the final checkpoint, export and evaluation), the ratio job / sum of the separate
runs, and whether each SAE's final eval FVU equals its separate run's. Timings mean
something only when nothing else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.experiments.many_vs_separate",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--train", required=True, help="TRAIN_DATA")
    p.add_argument("--eval", required=True, help="EVAL_DATA")
    p.add_argument("--gin_file", default="smollm2_many.gin")
    p.add_argument("--gin", action="append", default=[], help="NAME=VALUE for every SAE")
    p.add_argument("--workdir", default="runs/many_vs_separate")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None, help="markdown table (default WORKDIR/results.md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir)
    data = [f"--gin.TRAIN_DATA={args.train}", f"--gin.EVAL_DATA={args.eval}"]
    bindings = [*data, *(f"--gin.{b}" for b in args.gin), "--no_progress"]
    repeats = [one_repeat(args.gin_file, bindings, workdir / f"r{r}") for r in range(args.repeats)]
    result = {"gin_file": args.gin_file, "bindings": bindings, "repeats": repeats}
    (workdir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(repeats)
    print(table)
    Path(args.out or workdir / "results.md").write_text(table)
    return 0


def timed(cmd: list[str], log: Path) -> float:
    """Run `cmd` (output to `log`), return its wall-clock seconds; raise if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"error: {' '.join(cmd)} exited {code}; see {log}")
    return seconds


def final_row(workdir: Path) -> dict:
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"train_seconds": rows[-1]["train_seconds"],
            "fvu": [r for r in rows if "eval/fvu" in r][-1]["eval/fvu"]}  # fmt: skip


def one_repeat(gin_file: str, bindings: list[str], workdir: Path) -> dict:
    """The job, then each SAE alone: wall-clock, training seconds and final FVU of each."""
    job = workdir / "many"
    cmd = [sys.executable, "-m", "launch.train_many", f"--gin_file={gin_file}",
           f"--workdir={job}", *bindings]  # fmt: skip
    many_seconds = timed(cmd, workdir / "many.log")
    names = [s["name"] for s in json.loads((job / "saes.json").read_text())["saes"]]
    saes = []
    for name in names:
        alone = workdir / "separate" / name
        cmd = [sys.executable, "-m", "launch.train", f"--gin_file={job / name / 'config.gin'}",
               f"--workdir={alone}", "--no_progress"]  # fmt: skip
        seconds = timed(cmd, workdir / f"{name}.log")
        mine, theirs = final_row(job / name), final_row(alone)
        saes.append({"name": name, "seconds": seconds, "train_seconds": theirs["train_seconds"],
                     "fvu_many": mine["fvu"], "fvu_alone": theirs["fvu"],
                     "bitwise": mine["fvu"] == theirs["fvu"]})  # fmt: skip
    many_train = max(final_row(job / n)["train_seconds"] for n in names)
    separate = sum(s["seconds"] for s in saes)
    ratio = many_seconds / separate
    return {"many_seconds": many_seconds, "many_train_seconds": many_train,
            "separate_seconds": separate, "ratio": ratio, "saes": saes}  # fmt: skip


def markdown(repeats: list[dict]) -> str:
    lines = ["| repeat | run | wall s | training s | rest s | final eval FVU | = job's |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, rep in enumerate(repeats):
        for s in rep["saes"]:
            same = "bitwise" if s["bitwise"] else "differs"
            rest = s["seconds"] - s["train_seconds"]
            cells = (f"{s['seconds']:.1f}", f"{s['train_seconds']:.1f}", f"{rest:.1f}",
                     f"{s['fvu_alone']:.6f}", same)  # fmt: skip
            lines.append(f"| {r} | {s['name']} alone | " + " | ".join(cells) + " |")
        alone_train = sum(s["train_seconds"] for s in rep["saes"])
        rest = rep["separate_seconds"] - alone_train
        lines.append(f"| {r} | separate, total | {rep['separate_seconds']:.1f} | "
                     f"{alone_train:.1f} | {rest:.1f} | | |")  # fmt: skip
        lines.append(f"| {r} | **train_many** | {rep['many_seconds']:.1f} | "
                     f"{rep['many_train_seconds']:.1f} | "
                     f"{rep['many_seconds'] - rep['many_train_seconds']:.1f} | | |")  # fmt: skip
        lines.append(f"| {r} | ratio job / separate | **{rep['ratio']:.2f}x** | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
