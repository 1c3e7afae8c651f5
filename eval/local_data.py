"""The flags the eval scripts give gsq for a run of the bundled tiny model: its preset and the offline
WikiText-2 copy beside the clone (../shared/data; see its README). The package itself knows no such path."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = (ROOT / "models" / "tiny-deepseek-v3").resolve()
BUNDLED = {TINY, (ROOT / "models" / "tiny-qwen3-moe").resolve()}  # both take --preset tiny
DATA = ROOT.parent / "shared" / "data"
CALIBRATION = DATA / "wikitext-2" / "wiki.valid.tokens"
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"


def tiny_flags(model, watch: bool = True) -> list:
    """`--preset tiny` and the local data for a bundled model (`watch`: also the perplexity watch's test
    split, which gsq.prune does not take); nothing for any other model."""
    if Path(model).resolve() not in BUNDLED:
        return []
    return ["--preset", "tiny", "--dataset", str(CALIBRATION), *(["--eval-data", str(WIKI_TEST)] if watch else [])]


def side_by_side_flags(ap, work: str, record: str):
    """The flags the side-by-side scripts share: the test windows every checkpoint is evaluated on, where the
    checkpoints go, the record's path, the runs' output and resuming a record cut short."""
    ap.add_argument("--data-file", default=str(WIKI_TEST))
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=800)
    ap.add_argument("--work", default=work, help="where the checkpoints are written")
    ap.add_argument("--record", help=f"JSON record (default {record})")
    ap.add_argument("--quiet", action="store_true", help="hide the runs' output")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows the record already holds (same settings) and measure only the rest")
