"""The side-by-side scripts' records (eval/record.py): rewritten after every row and marked incomplete until the
end, so a comparison cut short keeps what it measured; `--resume` measures only the missing rows, and refuses
a record measured with other settings."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "eval"))
from record import Record  # noqa: E402


def test_a_comparison_cut_short_resumes_with_only_the_missing_rows(tmp_path):
    path, settings = tmp_path / "r.json", {"model": "m", "args": "--method gsq"}
    measured = []

    def measure(name, kl):
        def run():
            measured.append(name)
            return {"kl": kl}
        return run

    first = Record(path, settings, "runs", resume=False)
    first.row("a", measure("a", 0.1))
    on_disk = json.loads(path.read_text())
    assert on_disk["complete"] is False and on_disk["runs"]["a"]["kl"] == 0.1 and on_disk["runs"]["a"]["commit"]

    again = Record(path, settings, "runs", resume=True)
    assert again.row("a", measure("a", 9.0))["kl"] == 0.1  # kept, not measured again
    again.row("b", measure("b", 0.2))
    again.save(complete=True, summary={"best": "a"})
    assert measured == ["a", "b"]
    done = json.loads(path.read_text())
    assert done["complete"] is True and list(done["runs"]) == ["a", "b"] and done["summary"] == {"best": "a"}

    assert Record(path, settings, "runs", resume=False).rows == {}  # without --resume: measured afresh
    with pytest.raises(SystemExit, match="another args"):
        Record(path, {**settings, "args": "--method gptq"}, "runs", resume=True)
