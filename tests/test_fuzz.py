"""Fuzz of the four CLIs on a broken source model (hypothesis, derandomized: EXAMPLES = 40 examples, about a minute).

Each example copies a small model (the bundled tiny-deepseek-v3 cut to its first 3 layers, stored as two shards and
an index), breaks it in ONE way, and runs gsq.quantize, gsq.prune, gsq.eval and gsq.inspect on it in-process, through
`errors.run_cli` as `python -m` does. The breakages: config.json (a key deleted, a wrong type, a value out of range,
the file missing, not JSON, not an object), model.safetensors.index.json (a shard missing, an absolute or `../` path,
a tensor mapped to a shard that lacks it, conflicting duplicate entries, a non-string entry, no weight_map, not JSON)
and a shard's safetensors header (a bad dtype, data_offsets past the end, a shape off the byte length, a header length
past the end, a truncated file). The contract, for every CLI: it succeeds only where the breakage is harmless, else it
exits 2 with one `error:` line on stderr and no traceback (any other exception fails the test); a failed quantize or
prune leaves neither OUT nor OUT.partial; the source's files are byte-identical afterwards.
GSQ_FUZZ_EXAMPLES=N runs N examples instead.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from conftest import CALIB_DATA, TINY_MODEL, WIKI_TEST

EXAMPLES = int(os.environ.get("GSQ_FUZZ_EXAMPLES", "40"))
LAYERS = 3  # one dense layer, two MoE layers: a run that does start is short
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
CONFIG = json.loads((TINY_MODEL / "config.json").read_text())
INTS = sorted(k for k, v in CONFIG.items() if type(v) is int and not k.endswith("token_id"))  # a list of eos ids is valid
OUT_OF_RANGE = {"num_experts_per_tok": CONFIG["n_routed_experts"] + 1, "num_attention_heads": 0, "hidden_size": -256,
                "intermediate_size": -512, "moe_intermediate_size": -128, "num_hidden_layers": 0, "n_routed_experts": 0,
                "vocab_size": 0, "num_key_value_heads": 0, "kv_lora_rank": -64}

index = st.integers(0, 10**6)  # a tensor or shard, modulo how many there are
MUTATIONS = st.one_of(
    st.tuples(st.just("config: key deleted"), st.sampled_from(sorted(CONFIG))),
    st.tuples(st.just("config: wrong type"), st.sampled_from([*INTS, "dtype", "model_type", "hidden_act"]),
              st.sampled_from(["string", "list", "null", "float"])),
    st.tuples(st.just("config: out of range"), st.sampled_from(sorted(OUT_OF_RANGE))),
    st.sampled_from([("config: missing",), ("config: not JSON",), ("config: not an object",),
                     ("index: not JSON",), ("index: no weight_map",), ("index: weight_map a list",)]),
    st.tuples(st.sampled_from(["index: shard missing", "index: absolute path", "index: ../ path",
                               "index: wrong shard", "index: not a string"]), index),
    st.tuples(st.just("index: conflicting duplicate"), index, st.booleans()),
    st.tuples(st.just("header: dtype"), index, index, st.sampled_from(["BF17", "F32", "", "bf16"])),
    st.tuples(st.sampled_from(["header: offsets past the end", "header: shape off the bytes"]), index, index),
    st.tuples(st.sampled_from(["header: length past the end", "header: truncated"]), index, st.integers(1, 2**24)),
)


def build_base(dst: Path) -> Path:
    """The bundled tiny model's first LAYERS layers, as two shards and an index."""
    dst.mkdir(parents=True)
    for f in TINY_MODEL.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": LAYERS}, indent=2))
    tensors = {k: v for k, v in load_file(TINY_MODEL / "model.safetensors").items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < LAYERS}
    names = sorted(tensors)
    parts = (names[: len(names) // 2], names[len(names) // 2:])
    for shard, part in zip(SHARDS, parts):
        save_file({k: tensors[k] for k in part}, dst / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, part in zip(SHARDS, parts) for k in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def read_header(path: Path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:], n


def write_header(path: Path, header: dict, body: bytes, n: int):
    text = json.dumps(header).encode()
    text += b" " * (max(n, -(-len(text) // 8) * 8) - len(text))  # padded as safetensors pads
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def mutate(src: Path, m: tuple) -> bool:
    """Break the model in `src` as `m` says; True where the result may still be a valid model."""
    kind, *arg = m
    config, index_file = src / "config.json", src / "model.safetensors.index.json"
    c, idx = json.loads(config.read_text()), json.loads(index_file.read_text())
    wm = idx["weight_map"]
    name = sorted(wm)[arg[0] % len(wm)] if arg and type(arg[0]) is int else None
    other = {SHARDS[0]: SHARDS[1], SHARDS[1]: SHARDS[0]}
    if kind == "config: key deleted":
        del c[arg[0]]
    elif kind == "config: wrong type":
        key, as_ = arg
        c[key] = {"string": "bogus", "list": [c[key]], "null": None,
                  "float": c[key] + 0.5 if type(c[key]) is int else 1.5}[as_]
    elif kind == "config: out of range":
        c[arg[0]] = OUT_OF_RANGE[arg[0]]
    elif kind == "config: missing":
        config.unlink()
    elif kind == "config: not JSON":
        config.write_text('{"model_type": "deepseek_v3", ')
    elif kind == "config: not an object":
        config.write_text(json.dumps([c]))
    elif kind == "index: not JSON":
        index_file.write_text(index_file.read_text()[:-7])
        return False
    elif kind == "index: no weight_map":
        del idx["weight_map"]
    elif kind == "index: weight_map a list":
        idx["weight_map"] = sorted(wm.items())
    elif kind == "index: shard missing":
        (src / SHARDS[arg[0] % 2]).unlink()
    elif kind == "index: absolute path":
        wm[name] = str((src / wm[name]).resolve())
    elif kind == "index: ../ path":
        wm[name] = f"../{src.name}/{wm[name]}"
    elif kind == "index: wrong shard":
        wm[name] = other[wm[name]]
    elif kind == "index: not a string":
        wm[name] = 1
    elif kind == "index: conflicting duplicate":
        pairs = [(name, other[wm[name]]), (name, wm[name])][:: -1 if arg[1] else 1]
        pairs += [(k, v) for k, v in wm.items() if k != name]
        index_file.write_text('{"metadata": {}, "weight_map": {%s}}' % ", ".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                                                                for k, v in pairs))
        return False
    else:  # a shard's header
        shard = src / SHARDS[arg[0] % 2]
        header, body, n = read_header(shard)
        t = header[sorted(k for k in header if k != "__metadata__")[arg[1] % (len(header) - 1)]] if len(arg) > 1 else None
        if kind == "header: dtype":
            t["dtype"] = arg[2]
        elif kind == "header: offsets past the end":
            t["data_offsets"] = [len(body) + 8, len(body) + 8 + t["data_offsets"][1] - t["data_offsets"][0]]
        elif kind == "header: shape off the bytes":
            t["shape"][0] += 1
        elif kind == "header: length past the end":
            n = shard.stat().st_size + arg[1]
            shard.write_bytes(struct.pack("<Q", n) + shard.read_bytes()[8:])
            return False
        elif kind == "header: truncated":
            os.truncate(shard, shard.stat().st_size - 1 - arg[1] % shard.stat().st_size)
            return False
        write_header(shard, header, body, n)
        return False
    if config.is_file() and kind.startswith("config: ") and kind not in ("config: not JSON", "config: not an object"):
        config.write_text(json.dumps(c, indent=2))
    if kind.startswith("index: "):
        index_file.write_text(json.dumps(idx))
    return kind == "config: key deleted" or arg[-1:] == ["null"]


def commands(src: Path, out: Path) -> dict:
    from gsq import eval, inspect, prune, quantize

    small = [*CALIB_DATA, "--num-samples", "4", "--seqlen", "32"]
    return {"quantize": (quantize, ["--model", str(src), "--out", str(out / "q"), *small, "--batch-size", "4",
                                    "--min-steps", "1", "--epochs", "0", "--eval-every", "0", "--finetune-scales", "0",
                                    "--gptq-samples", "4", "--scale-grid", "5"], out / "q"),
            "prune": (prune, ["--model", str(src), "--out", str(out / "p"), "--keep", "2", *small], out / "p"),
            "eval": (eval, ["--model", str(src), "--data-file", str(WIKI_TEST), "--seqlen", "32", "--max-windows", "2",
                            "--no-card", "--device", "cpu"], None),
            "inspect": (inspect, [str(src)], None)}


def run_cli(module, argv, capfd) -> tuple:
    """(exit status, stderr) of `python -m module argv`, in this process; any other exception propagates."""
    from gsq import errors

    capfd.readouterr()
    streams = {h: h.stream for h in logging.getLogger("transformers").handlers if isinstance(h, logging.StreamHandler)}
    for h in streams:  # transformers' warnings into this capture, as a process's stderr would hold them
        h.stream = sys.stderr
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        errors.run_cli(module.main, argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for h, stream in streams.items():
            h.stream = stream
    return code, capfd.readouterr().err


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def problems(mutation, src: Path, out: Path, capfd) -> list:
    """What breaks the contract when each CLI runs on `src`, broken by `mutation`."""
    may_pass = mutate(src, mutation)
    before, found = digest(src), []
    for cli, (module, argv, made) in commands(src, out).items():
        code, err = run_cli(module, argv, capfd)
        lines = err.strip().splitlines()
        if cli == "eval":  # tests/README.md: its progress and a notice may come before the line of a model it cannot run
            lines = [s for s in lines if s.strip() and not s.lstrip().startswith(("Loading weights", "transformers cannot run "))]
        if digest(src) != before:
            found.append(f"{cli}: changed the source")
        if code == 0 and ("| MISSING" in err or "| UNEXPECTED" in err):  # transformers' load report
            found.append(f"{cli}: ran a model whose config does not match its weights: {err.strip()[-300:]!r}")
        elif code == 0 and not may_pass and cli != "inspect":
            found.append(f"{cli}: accepted it (exit 0)")
        elif code == 0 and cli == "inspect":  # the source holds nothing quantized: inspect always refuses it
            found.append("inspect: exit 0 on an unquantized source")
        elif code != 0 and (code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err):
            found.append(f"{cli}: exit {code}, stderr {err.strip()[-600:]!r}")
        if code != 0 and made is not None and (made.exists() or Path(f"{made}.partial").exists()):
            found.append(f"{cli}: failed but left {made.name}{'' if made.exists() else '.partial'}")
    return found


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import torch

    from gsq.kernels import fake_quant, pack

    # the torch reference on a CPU, as `python -m gsq.quantize` runs; one thread (as under `make test`: two at once
    # on two busy cores made a run that starts 5x slower)
    was = fake_quant.INTERPRET, pack.INTERPRET, torch.get_num_threads()
    fake_quant.INTERPRET = pack.INTERPRET = False
    torch.set_num_threads(1)
    yield build_base(tmp_path_factory.mktemp("fuzz") / "base")
    fake_quant.INTERPRET, pack.INTERPRET = was[:2]
    torch.set_num_threads(was[2])


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: an example is one mutation already, and slow
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=MUTATIONS)
def test_a_broken_source_is_one_error_line(mutation, base, capfd):
    work = Path(tempfile.mkdtemp(prefix="gsq-fuzz-"))
    try:
        shutil.copytree(base, work / "src")
        found = problems(mutation, work / "src", work, capfd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not found, f"{mutation}:\n" + "\n".join(found)
