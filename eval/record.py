"""A side-by-side script's JSON record, rewritten after every measured row: a comparison cut short keeps what it
measured (marked "complete": false), and `--resume` measures only the rows the record lacks. A resumed record
must have been measured with the same settings; each row names the commit that measured it."""

import json
import subprocess
from datetime import date
from pathlib import Path

import torch

from local_data import ROOT


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


class Record:
    def __init__(self, path: Path, settings: dict, section: str, resume: bool):
        self.path, self.settings, self.section = path, settings, section
        old = json.loads(path.read_text()) if resume and path.exists() else {}
        changed = [k for k, v in settings.items() if k in old and old[k] != v]
        if changed:
            raise SystemExit(f"--resume: {path} was measured with another {', '.join(changed)}: "
                             f"drop --resume or name another --record")
        self.rows = old.get(section, {})
        if self.rows:
            print(f"--resume: {len(self.rows)} rows kept from {path}: {', '.join(self.rows)}")

    def row(self, name: str, measure) -> dict:
        """The row `name`: kept from the resumed record, or measured now and written at once."""
        if name not in self.rows:
            self.rows[name] = {**measure(), "commit": commit()}
            self.save(complete=False)
        return self.rows[name]

    def save(self, complete: bool, **results):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        record = {"date": date.today().isoformat(), "commit": commit(), "device": device, **self.settings,
                  "complete": complete, self.section: self.rows, **results}
        partial = self.path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(self.path)
