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
