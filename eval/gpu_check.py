"""`make gpu-check`: one command that proves a GPU machine, and one record anyone can read.

    python eval/gpu_check.py --out DIR [--device cuda|cpu] [--data DIR] [--parts env,kernels,...]

Writes DIR/gpu-check.json (rewritten after every part; `"complete": true` only at the end) and
DIR/summary.txt. The parts, in order, each a child process with its own time limit inside the whole
check's `--budget`; a part that fails or runs out of time is recorded as such and the rest still run:
- env: GPU name and memory, driver, CUDA, torch / triton / transformers / compressed-tensors versions;
- kernels: eval/bench_kernels.py at Kimi-K2.5 expert shapes, next to the copy bandwidth measured in the same run;
- quantize: the bundled tiny model, shipped preset (`--preset tiny`), on the device: wall time, peak GPU memory;
- eval: python -m gsq.eval of that output against the original: KL and top-1 next to the CPU record of the
  same settings (`--cpu-record`);
- plan: the memory plan of that run (`--dry-run --json`, same flags) against the peak it measured;
- parallel: eval/bench_parallel.py --gpu, one rank's share of a Kimi-K2.5 layer: seconds per step and per
  layer, the hours it implies for 61 layers on 8 GPUs, the plan's figure against the measured peak;
- resume: the same tiny run killed (SIGKILL) once layer 2 is done, resumed, compared byte for byte with
  the uninterrupted one.
`--device cpu` runs every part at toy sizes (about two minutes on 2 cores; the tests run it), so the
script cannot rot between the times a GPU is at hand; its figures check the paths, they are no benchmark.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

from local_data import DATA, ROOT

PARTS = ("env", "kernels", "quantize", "eval", "plan", "parallel", "resume")
# seconds each part may take at most on a GPU (the whole check: --budget); on a CPU the toy sizes need less
LIMITS = {"env": 30, "kernels": 60, "quantize": 120, "eval": 45, "plan": 30, "parallel": 75, "resume": 130}
CPU_RECORD = "eval/results/tiny-deepseek-v3-shipped-2026-12-02.json"
# toy sizes for --device cpu: GPTQ init and a few GSQ steps on every expert, 2 steps of the scale fine-tune
TOY = ["--num-samples", "16", "--seqlen", "128", "--min-steps", "4", "--epochs", "0", "--batch-size", "4",
       "--scale-grid", "20", "--eval-windows", "4", "--eval-seqlen", "128", "--finetune-scales", "2"]
FILES = {"calibration": "wikitext-2/wiki.valid.tokens", "test": "wikitext-2-raw/wiki.test.raw"}
RECORDS = ("gsq_run.json",)  # what a resumed run may write differently (its times)


class Failed(Exception):
    """A part failed: its one-line reason."""


def data_file(data: Path, key: str) -> Path:
    """The WikiText-2 file under --data, in the shared layout (wikitext-2/...) or flat (make gpu-wheels' .whl/data)."""
    for path in (data / FILES[key], data / Path(FILES[key]).name):
        if path.is_file():
            return path
    sys.exit(f"error: --data {data} has no {FILES[key]} (nor {Path(FILES[key]).name})")


def child(cmd: list, limit: float, env: dict | None = None) -> str:
    """Run `cmd` from the repository root within `limit` seconds: its stdout, or Failed with its last error line."""
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise Failed(f"out of time after {limit:.0f} s: {' '.join(map(str, cmd[1:4]))} ...") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise Failed(f"exit {proc.returncode}: {lines[-1][:300]}")
    return proc.stdout


class Check:
    def __init__(self, args):
        self.args, self.cuda = args, args.device.startswith("cuda")
        self.out = Path(args.out).resolve()
        self.model = str(Path(args.model).resolve())
        self.calib, self.test = data_file(Path(args.data), "calibration"), data_file(Path(args.data), "test")
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # gsq picks its paths itself
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.flags = ["--preset", "tiny", "--dataset", str(self.calib), "--eval-data", str(self.test),
                      "--device", args.device, *([] if self.cuda else TOY)]
        self.record = {"device": args.device, "date": date.today().isoformat(), "commit": commit(),
                       "toy": not self.cuda, "complete": False, "parts": {}}
        self.results = {}

    def quantize(self, out: Path, *extra) -> list:
        return [sys.executable, "-m", "gsq.quantize", "--model", self.model, "--out", str(out), *self.flags, *extra]

    def env_part(self, limit):
        import torch

        row = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cpu_cores": os.cpu_count()}
        for name in ("triton", "transformers", "compressed-tensors", "safetensors"):
            try:
                row[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                row[name] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            row.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       gpus=torch.cuda.device_count(), capability=".".join(map(str, torch.cuda.get_device_capability())))
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True) if shutil.which("nvidia-smi") else None
            row["driver"] = smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 else None
        else:
            row["gpu"] = None
        row["line"] = (f"{row['gpu']}, {row.get('gpu_memory_gib')} GiB, driver {row.get('driver')}, CUDA {row['cuda']}"
                       if self.cuda else f"CPU ({row['cpu_cores']} cores)") + \
            f"; torch {row['torch']}, triton {row['triton']}, transformers {row['transformers']}, " \
            f"compressed-tensors {row['compressed-tensors']}"
        return row

    def kernels_part(self, limit):
        path = self.out / "kernels.json"
        cmd = [sys.executable, "eval/bench_kernels.py", "--out", str(path)]
        env = dict(self.env)
        if not self.cuda:  # the interpreter at one small shape: the paths run, nothing is timed
            cmd += ["--shapes", "128x256", "--reps", "1"]
            env["TRITON_INTERPRET"] = "1"
        child(cmd, limit, env)
        bench = json.loads(path.read_text())
        copy = bench["copy_GBps"]
        rows = [{"op": r["op"], "shape": r["shape"], "kernel_ms": r["kernel_ms"], "speedup": r["speedup"],
                 "kernel_GBps": r["kernel_GBps"], "of_copy": r["kernel_GBps"] / copy if copy else None}
                for r in bench["results"]]
        if bench["interpreter"]:
            return {"copy_GBps": None, "rows": rows, "line": "Triton interpreter: " + ", ".join(
                f"{r['op']} {'x'.join(map(str, r['shape']))}" for r in rows) + " ran (not timed)"}
        return {"copy_GBps": copy, "rows": rows, "line": f"copy {copy:.0f} GB/s; " + "; ".join(
            f"{r['op']} {'x'.join(map(str, r['shape']))}: {r['kernel_GBps']:.0f} GB/s = {100 * r['of_copy']:.0f}% "
            f"of copy, {r['speedup']:.1f}x eager" for r in rows)}

    def quantize_part(self, limit):
        out = self.out / "work" / "tiny-w2"
        t0 = time.time()
        child(self.quantize(out, "--overwrite"), limit, self.env)
        wall = time.time() - t0
        run = json.loads((out / "gsq_run.json").read_text())
        gpu = [layer["peak_gpu_mb"] for layer in run["layers"] if "peak_gpu_mb" in layer]
        row = {"wall_s": round(wall, 1), "run_s": run["seconds"], "peak_rss_mb": round(run["peak_rss_mb"]),
               "peak_gpu_mb": round(max(gpu)) if gpu else None, "ppl_watch": run.get("ppl", [])}
        row["line"] = f"wall {wall:.0f} s, peak RSS {row['peak_rss_mb']} MB" + \
            (f", peak GPU {row['peak_gpu_mb']} MB" if gpu else "")
        return row

    def eval_part(self, limit):
        self.needs("quantize")
        settings = json.loads((ROOT / self.args.cpu_record).read_text())["eval"] if self.cuda else \
            {"seqlen": 128, "max_windows": 4}
        cmd = [sys.executable, "-m", "gsq.eval", "--model", str(self.out / "work" / "tiny-w2"), "--reference",
               self.model, "--data-file", str(self.test), "--seqlen", str(settings["seqlen"]), "--max-windows",
               str(settings["max_windows"]), "--device", self.args.device, "--json", "--no-card"]
        t0 = time.time()
        result = json.loads(child(cmd, limit, self.env).strip().splitlines()[-1])
        row = {k: result[k] for k in ("ppl", "kl", "top1", "windows")} | {"seqlen": settings["seqlen"],
                                                                          "wall_s": round(time.time() - t0, 1)}
        row["line"] = f"KL {row['kl']:.5f}, top-1 {100 * row['top1']:.2f}%, ppl {row['ppl']:.3f}"
        if self.cuda:  # the same settings on a CPU, as recorded
            cpu = json.loads((ROOT / self.args.cpu_record).read_text())["runs"]["gsq"]
            row["cpu"] = {"record": self.args.cpu_record, "kl": cpu["kl"], "top1": cpu["top1"], "ppl": cpu["ppl"],
                          "quantize_seconds": cpu["quantize_seconds"]}
            row["line"] += f" (CPU record: KL {cpu['kl']:.5f}, top-1 {100 * cpu['top1']:.2f}%, ppl {cpu['ppl']:.3f})"
        return row

    def plan_part(self, limit):
        run = self.needs("quantize")
        plan = json.loads(child(self.quantize(self.out / "work" / "plan", "--dry-run", "--json"), limit,
                                self.env))
        where = "gpu" if self.cuda else "host"
        planned, usable = plan["totals"][where]
        measured = (run["peak_gpu_mb"] if self.cuda else run["peak_rss_mb"]) * 2**20
        row = {"where": where, "planned_bytes": planned, "usable_bytes": usable, "measured_bytes": measured,
               "measured_over_planned": round(measured / planned, 3), "experts_per_batch": plan["experts_per_batch"],
               "placement": plan["placement"]}
        row["line"] = (f"{'GPU' if self.cuda else 'host'} peak: planned {planned / 1e9:.2f} GB, measured "
                       f"{measured / 1e9:.2f} GB ({100 * measured / planned:.0f}% of the plan)")
        if measured > planned:
            raise Failed(row["line"] + ": the plan is short")
        return row

    def parallel_part(self, limit):
        path = self.out / "parallel.json"
        cmd = [sys.executable, "eval/bench_parallel.py", "--gpu", "--device", self.args.device, "--out", str(path)]
        if not self.cuda:
            cmd += ["--shape", "256x128", "--experts", "2", "--steps", "2"]
        child(cmd, limit, self.env)
        row = json.loads(path.read_text())
        row["line"] = (f"{row['experts_per_batch']} experts: {row['seconds_per_step']:.3f} s per step, "
                       f"{row['seconds_per_layer']:.0f} s per layer share; Kimi-K2.5 on 8 GPUs: "
                       f"{row['kimi_gsq_hours_8_gpus']:.1f} h of GSQ steps (paper: 24 h in all)")
        if row["peak_gpu_bytes"]:
            row["line"] += (f"; plan {row['plan_training_bytes'] / 1e9:.1f} GB + kept batches "
                            f"{row['batches_bytes'] / 1e9:.1f} GB vs measured {row['peak_gpu_bytes'] / 1e9:.1f} GB")
        return row

    def resume_part(self, limit):
        self.needs("quantize")
        out, deadline = self.out / "work" / "tiny-w2-resumed", time.time() + limit
        state = out.with_name(out.name + ".partial") / ".gsq-work" / "state.json"
        proc = subprocess.Popen(self.quantize(out, "--overwrite"), cwd=ROOT, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed_at = None
        while proc.poll() is None and time.time() < deadline:
            try:
                killed_at = json.loads(state.read_text())["next_layer"]
            except (OSError, ValueError, KeyError):
                killed_at = None
            if killed_at is not None and killed_at >= 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise Failed(f"out of time after {limit:.0f} s before layer 2 was done")
        if proc.returncode != -signal.SIGKILL:
            raise Failed(f"the run ended (exit {proc.returncode}) before it could be killed after layer 2")
        child(self.quantize(out, "--resume"), max(1.0, deadline - time.time()), self.env)
        a, b = digest(self.out / "work" / "tiny-w2"), digest(out)
        differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
        row = {"killed_after_layer": killed_at, "files": len(a), "identical": not differ, "differ": differ}
        row["line"] = f"killed after layer {killed_at}, resumed: " + \
            (f"identical bytes ({len(a)} files, {', '.join(RECORDS)} aside)" if not differ else f"differs in {differ}")
        if differ:
            raise Failed(row["line"])
        return row

    def needs(self, part: str) -> dict:
        if self.record["parts"].get(part, {}).get("status") != "ok":
            raise Failed(f"skipped: needs the {part} part, which did not pass")
        return self.results[part]

    def run(self, parts) -> bool:
        self.out.mkdir(parents=True, exist_ok=True)
        end = time.time() + self.args.budget
        for name in parts:
            limit = min(LIMITS[name], end - time.time())
            t0 = time.time()
            try:
                if limit < 1:
                    raise Failed("skipped: the check's --budget is spent")
                row = getattr(self, f"{name}_part")(limit)
                self.results[name] = row
                entry = {"status": "ok", **row}
            except Failed as exc:
                entry = {"status": "failed", "line": str(exc)}
            except Exception as exc:  # a part's own bug is a finding too; the others still run
                entry = {"status": "failed", "line": f"{type(exc).__name__}: {exc}"[:300]}
            entry["seconds"] = round(time.time() - t0, 1)
            self.record["parts"][name] = entry
            print(f"{name:<9} {entry['status']:<7} {entry['seconds']:>6.1f} s  {entry['line']}", flush=True)
            self.save()
        self.record["complete"] = True
        self.save()
        return all(p["status"] == "ok" for p in self.record["parts"].values())

    def save(self):
        path = self.out / "gpu-check.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(path.with_suffix(".tmp"), path)
        head = f"gsq gpu-check on {self.args.device} ({'toy sizes' if not self.cuda else 'full'}), " \
               f"commit {self.record['commit']}, {self.record['date']}" + ("" if self.record["complete"] else
                                                                           " (incomplete)")
        lines = [head] + [f"{n:<9} {p['status']:<7} {p['seconds']:>6.1f} s  {p['line']}"
                          for n, p in self.record["parts"].items()]
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name not in RECORDS}


def commit() -> str:
    """The checkout's commit: GSQ_COMMIT where the copy has no git history (a device machine's), else git's."""
    if os.environ.get("GSQ_COMMIT"):
        return os.environ["GSQ_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 else "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu-check.json, summary.txt and the runs")
    ap.add_argument("--device", default="cuda", help="cuda (the check), or cpu (toy sizes: the path runs)")
    ap.add_argument("--data", default=str(DATA),
                    help="folder with the WikiText-2 files (wikitext-2/wiki.valid.tokens, wikitext-2-raw/wiki.test.raw, "
                         "or both flat, as make gpu-wheels puts them in .whl/data)")
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-deepseek-v3"))
    ap.add_argument("--cpu-record", default=CPU_RECORD, help="the CPU run of the same settings to compare with")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=460, help="seconds for the whole check")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        sys.exit(f"error: --parts {args.parts!r}: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(PARTS)})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no CUDA device (DEVICE=cpu runs the toy check)")
    elif args.device != "cpu":
        sys.exit(f"error: --device {args.device!r}: cuda, cuda:N or cpu")
    if not (ROOT / args.cpu_record).is_file():
        sys.exit(f"error: --cpu-record {args.cpu_record}: no such file")
    check = Check(args)
    ok = check.run(parts)
    print(f"recorded {check.out / 'gpu-check.json'} and {check.out / 'summary.txt'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
