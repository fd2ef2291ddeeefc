"""Conversion on a Ray cluster (`ferroquant convert --ray`, `ferroquant.distributed.convert`).

The reference is the single-machine `hf_to_gguf` on the same checkpoint: a synthetic sharded
Llama-layout folder written here (three safetensors shards and model.safetensors.index.json,
bf16 weights, GQA, an untied head, a byte-fallback BPE tokenizer built with `tokenizers`). The
cluster is Ray's own `ray.cluster_utils.Cluster`: a head without CPUs and two worker nodes of
one CPU, all on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping in the
machine's network address; no dashboard, no usage stats). Tests that start it are marked
`cluster`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

# before Ray starts anything: loopback only, nothing sent out
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from ferroquant import cli  # noqa: E402
from ferroquant.gguf import tensor_nbytes  # noqa: E402
from ferroquant.models.convert import hf_to_gguf, plan_hf_to_gguf  # noqa: E402

from peers import require  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 4, 4, 2


def write_tokenizer(out: Path) -> int:
    """A byte-fallback BPE tokenizer (llama.cpp's "llama" vocabulary path); its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(vocab)


def write_checkpoint(out: Path, n_shards: int = 3) -> Path:
    torch = require("torch")
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape: int):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    kv = H * KV_HEADS // HEADS
    ts = {"model.embed_tokens.weight": r(vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        ts |= {
            p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(kv, H),
            p + "self_attn.v_proj.weight": r(kv, H), p + "self_attn.o_proj.weight": r(H, H),
            p + "mlp.gate_proj.weight": r(FFN, H), p + "mlp.up_proj.weight": r(FFN, H),
            p + "mlp.down_proj.weight": r(H, FFN), p + "input_layernorm.weight": r(H),
            p + "post_attention_layernorm.weight": r(H),
        }  # fmt: skip
    ts |= {"model.norm.weight": r(H), "lm_head.weight": r(vocab, H)}
    names = list(ts)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: ts[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama-sharded")


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "single.q4_k_m.gguf"
    hf_to_gguf(checkpoint, out, "q4_k_m")
    return out.read_bytes()


# `cluster`: the local loopback Ray cluster fixture in tests/conftest.py


@pytest.fixture
def driver_runs(monkeypatch) -> list:
    """Every driver run (`driver._Run`) a test starts, kept for inspection."""
    from ferroquant.distributed import driver

    runs: list = []

    class Spy(driver._Run):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs.append(self)

    monkeypatch.setattr(driver, "_Run", Spy)
    return runs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".resume" in p.name)


# -- no cluster: the plan, the side file, bad input --------------------------------------------


def test_tasks_cover_each_tensor_in_whole_rows_and_heads(checkpoint):
    from ferroquant.distributed.checkpoint import check_checkpoint, split_tasks

    plan = plan_hf_to_gguf(checkpoint, "q4_k_m")
    tasks = split_tasks(plan, check_checkpoint(checkpoint), max_task_bytes=64 * 1024)
    assert any(len(ts) > 1 for ts in tasks)  # some tensors are cut
    for job, ts in zip(plan.tensors, tasks, strict=True):
        rows = [t.rows or (0, job.shape[0]) for t in ts]
        assert [a for a, _ in rows] == [0, *(b for _, b in rows[:-1])], job.gname
        assert rows[-1][1] == job.shape[0] and all(a < b for a, b in rows)
        assert sum(t.out_bytes for t in ts) == tensor_nbytes(job.shape, job.qtype)
        if ".attn_q." in job.gname or ".attn_k." in job.gname:  # whole heads only
            head = job.shape[0] // (HEADS if ".attn_q." in job.gname else KV_HEADS)
            assert all(a % head == 0 and b % head == 0 for a, b in rows), job.gname


_KILLED_WRITER = """
import os, sys, zlib
import numpy as np
from pathlib import Path
from ferroquant.distributed.journal import Journal, side_path
from ferroquant.gguf import GGUFWriter
out = Path(sys.argv[1])
blobs = [np.full(1000, i + 1, np.float32) for i in range(3)]
j = Journal(side_path(out), "fp-1", resume=False)
w = GGUFWriter(out, "llama")
for i, b in enumerate(blobs):
    w.add_tensor_info(f"t{i}", b.shape, "f32")
for i, b in enumerate(blobs):
    w.write_tensor_data(b)
    w.flush()  # as the driver does: the bytes are in the file before the record
    raw = b.view(np.uint8)  # t1 as two row ranges, each with its worker's crc32
    parts = [(len(p), zlib.crc32(p)) for p in (raw[:1200], raw[1200:])] if i == 1 else None
    j.add(f"t{i}", b, parts)
os._exit(0)  # killed: no close, the temporary file stays
"""


def test_side_file_resumes_from_the_killed_writers_file(tmp_path):
    """The side file lists finished tensors; their bytes are taken from the temporary file the
    killed driver left, each checked against its crc32: a torn tensor there, or a torn record
    in the side file, is converted again."""
    from ferroquant.distributed.journal import Journal, side_path

    out = tmp_path / "out.gguf"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], check=True, timeout=60)
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    side = side_path(out)
    with open(tmp, "r+b") as f:  # t2's bytes did not all reach the file
        f.truncate(tmp.stat().st_size - 100)
    j = Journal(side, "fp-1", resume=True, data_bytes=1 << 20)
    assert set(j.done) == {"t0", "t1"}
    data, parts = j.read("t1")
    np.testing.assert_array_equal(data.view(np.float32), np.full(1000, 2, np.float32))
    assert parts == [(1200, zlib.crc32(data[:1200])), (2800, zlib.crc32(data[1200:]))]
    j.add("t2", np.zeros(4, np.uint8))
    j.close()
    with open(side, "r+b") as f:  # this run died while writing its t2 record
        f.truncate(side.stat().st_size - 3)
    j = Journal(side, "fp-1", resume=True, data_bytes=1 << 20)
    assert set(j.done) == {"t0", "t1"}  # still from the first run's file
    j.remove()  # complete: the side file and the killed run's file are gone
    assert not _leftovers(tmp_path)
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], check=True, timeout=60)
    with pytest.raises(ValueError, match="belongs to another conversion"):
        Journal(side, "fp-2", resume=True)
    Journal(side, "fp-2", resume=False).remove()  # without resume: started over, then done
    assert not _leftovers(tmp_path)  # the killed run's file goes too


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _bad_checkpoints(checkpoint: Path, tmp: Path):
    """(folder, the file the error must name, what it must say)."""
    shard2 = "model-00002-of-00003.safetensors"
    missing = _copy(checkpoint, tmp / "missing")
    (missing / shard2).unlink()
    yield missing, missing / shard2, "missing, but model.safetensors.index.json names it"
    truncated = _copy(checkpoint, tmp / "truncated")
    with open(truncated / shard2, "r+b") as f:
        f.truncate((truncated / shard2).stat().st_size - 1000)
    yield truncated, truncated / shard2, "truncated"
    short = _copy(checkpoint, tmp / "short")
    with open(short / shard2, "r+b") as f:
        f.truncate(100)  # inside the header
    yield short, short / shard2, "runs past the file"
    garbled = _copy(checkpoint, tmp / "garbled")
    raw = bytearray((garbled / shard2).read_bytes())
    raw[8:20] = b"{not json!!}"
    (garbled / shard2).write_bytes(bytes(raw))
    yield garbled, garbled / shard2, "malformed safetensors header"


def test_bad_checkpoints_are_one_error_naming_the_file_and_write_nothing(checkpoint, tmp_path):
    """Checked before Ray is even contacted: the address here has nothing listening."""
    import ferroquant.distributed as fd

    for folder, culprit, says in _bad_checkpoints(checkpoint, tmp_path):
        out = folder / "out.gguf"
        with pytest.raises(ValueError) as e:
            fd.convert(folder, out, "q4_k_m", address="127.0.0.1:9")
        assert str(culprit) in str(e.value) and says in str(e.value), str(e.value)
        assert not out.exists() and not _leftovers(folder), folder


def test_bad_checkpoints_fail_the_same_way_without_ray(checkpoint, tmp_path):
    """The single-machine convert runs the same checks before it writes anything."""
    from ferroquant.models.convert import hf_to_gguf

    for folder, culprit, says in _bad_checkpoints(checkpoint, tmp_path):
        out = folder / "out.gguf"
        with pytest.raises(ValueError) as e:
            hf_to_gguf(folder, out, "q4_k_m")
        assert str(culprit) in str(e.value) and says in str(e.value), str(e.value)
        assert not out.exists() and not _leftovers(folder), folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_task_that_cannot_write_the_output_names_it(checkpoint, tmp_path):
    """write="workers" on a node that does not see the output file: one error naming the file
    and the tensor (the task runs here, without Ray)."""
    from ferroquant.distributed.worker import convert_part

    plan = plan_hf_to_gguf(checkpoint, "q4_k_m")
    i = next(k for k, t in enumerate(plan.tensors) if t.hf_name is not None)
    missing = tmp_path / "elsewhere" / ".out.gguf.1.x.tmp"
    with pytest.raises(ValueError, match=f"{plan.tensors[i].hf_name}.*cannot write the output "
                                         f"file {missing}"):  # fmt: skip
        convert_part(plan, i, None, None, 1, None, (str(missing), 0))
    data, crc = convert_part(plan, i, None, None, 1)
    target = tmp_path / "out.bin"
    target.write_bytes(b"\0" * (data.nbytes + 8))
    assert convert_part(plan, i, None, None, 1, None, (str(target), 8)) == (data.nbytes, crc)
    assert target.read_bytes()[8:] == data.tobytes() and crc == zlib.crc32(data)


def test_cli_unreachable_address_is_one_line_within_a_timeout(checkpoint, tmp_path):
    port = _free_port()  # nothing listens there once the socket is closed
    out = tmp_path / "out.gguf"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ferroquant", "convert", str(checkpoint), str(out), "--qtype",
         "q8_0", "--ray", f"127.0.0.1:{port}", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr, r.stderr
    assert took < 60, took  # mostly interpreter and torch start-up; the probe itself is instant
    assert not out.exists() and not _leftovers(tmp_path)
    for bad in (["--resume"], ["--ray", "nonsense"]):  # --resume alone; an address without port
        r = subprocess.run([sys.executable, "-m", "ferroquant", "convert", str(checkpoint),
                            str(out), "--quiet", *bad], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
        assert ("add --ray" if bad == ["--resume"] else "expected auto, HOST:PORT") in r.stderr


_WITHOUT_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
from ferroquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_without_ray_names_the_distributed_extra(checkpoint, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_RAY, "convert", str(checkpoint), str(tmp_path / "o.gguf"),
         "--ray"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install 'ferroquant[distributed]'" in r.stderr, r.stderr


# -- on a local cluster --------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("transfer", "write"),
    [("shared-fs", "driver"), ("object-store", "driver"), ("shared-fs", "workers")],
)
def test_same_bytes_as_single_machine_within_the_window(
    cluster, checkpoint, reference, tmp_path, driver_runs, transfer, write
):
    """Large tensors cut into row ranges (64 KiB of float32 per task), a 192 KiB window: the
    driver never has more in flight than the window plus one task. write="workers": each task
    writes its row range into the output's temporary file at its offset."""
    import ferroquant.distributed as fd

    out = tmp_path / "ray.gguf"
    window = 192 * 1024
    chosen = fd.convert(checkpoint, out, "q4_k_m", address=cluster.address, transfer=transfer,
                        write=write, window_bytes=window, max_task_bytes=64 * 1024)  # fmt: skip
    assert out.read_bytes() == reference
    assert chosen == plan_hf_to_gguf(checkpoint, "q4_k_m").chosen
    assert not _leftovers(tmp_path)  # the side file is gone
    (run,) = driver_runs
    biggest = max(run._cost(t) for ts in run.tasks for t in ts)
    assert 0 < run.peak_in_flight <= window + biggest


@pytest.mark.cluster
def test_cli_ray_on_the_cluster_prints_the_summary(cluster, checkpoint, reference, tmp_path, capfd):
    out = tmp_path / "cli.gguf"
    args = ["convert", str(checkpoint), str(out), "--qtype", "q4_k_m", "--ray", cluster.address]
    assert cli.main([*args, "--ray-transfer", "object-store", "--ray-window", "1"]) == 0
    assert out.read_bytes() == reference
    out.unlink()
    assert cli.main([*args, "--ray-write", "workers", "--quiet"]) == 0
    assert out.read_bytes() == reference
    cap = capfd.readouterr()
    assert "tensors" in cap.err and "B/s" in cap.err  # the progress bar: tensors, bytes, rate
    assert str(out) in cap.out


@pytest.mark.cluster
def test_sockets_are_on_loopback_only(cluster):
    """Every Ray node registered as 127.0.0.1, and no Ray process holds a socket elsewhere."""
    ray = require("ray")
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    r = subprocess.run(["ss", "-tanp"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("ss is not available")
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:")
    names = ("raylet", "gcs_server", "ray::", "plasma")
    ray_lines = [ln for ln in r.stdout.splitlines()[1:] if any(k in ln for k in names)]
    assert any(ln.startswith("LISTEN") for ln in ray_lines)
    for ln in ray_lines:
        state, _, _, local, peer = ln.split()[:5]
        assert local.startswith(loopback), ln
        assert state == "LISTEN" or peer.startswith(loopback), ln


_DRIVER = """
import os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ferroquant.distributed as fd
def slow(name, done, total):
    print(done, flush=True)
    time.sleep(0.3)
fd.convert(sys.argv[1], sys.argv[2], "q4_k_m", address=sys.argv[3], on_tensor=slow,
           write=sys.argv[4])
"""


@pytest.mark.cluster
@pytest.mark.parametrize("write", ["driver", "workers"])
def test_killed_driver_leaves_no_file_and_resume_finishes(
    cluster, checkpoint, reference, tmp_path, caplog, write
):
    """Killed with write="driver" or "workers", resumed the other way: the finished tensors are
    copied from the killed run's temporary file either way."""
    import ferroquant.distributed as fd

    out = tmp_path / "killed.gguf"
    p = subprocess.Popen([sys.executable, "-c", _DRIVER, str(checkpoint), str(out),
                          cluster.address, write], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if int(line) >= 8:  # 8 tensors written and kept in the side file
                break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait(timeout=60)
    assert not out.exists()
    side = fd.side_path(out)
    assert 0 < side.stat().st_size < 64 * 1024  # names and crc32s; the bytes are in the .tmp
    assert any(n.endswith(".tmp") for n in _leftovers(tmp_path))  # what SIGKILL leaves behind
    caplog.set_level("INFO", logger="ferroquant.distributed")
    other = "workers" if write == "driver" else "driver"
    fd.convert(checkpoint, out, "q4_k_m", address=cluster.address, resume=True, write=other)
    assert out.read_bytes() == reference
    assert not _leftovers(tmp_path)  # side file and the dead writer's temporary file: gone
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resumed and int(resumed[0].split()[1]) >= 8, resumed


@pytest.mark.cluster
def test_killed_worker_node_gives_the_same_bytes(cluster, checkpoint, tmp_path, driver_runs):
    """After the third tensor is written, the driver waits for the tasks in flight and kills a
    worker node (raylet, object store, workers) that holds some of their results (f32 tensors:
    results over 100 KiB live in the node's object store, not inline at the driver): Ray rebuilds
    them by running those tasks again on the other node, and the bytes are the same. A fresh
    node then takes the dead one's place."""
    ray = require("ray")
    import ferroquant.distributed as fd

    ref = tmp_path / "single.gguf"
    hf_to_gguf(checkpoint, ref, "f32")
    lost = []

    def kill(name: str, done: int, total: int) -> None:
        if done != 3:
            return
        time.sleep(1.0)  # the driver's main thread fills the writer's queue and waits on it
        refs = [r for _, r, _ in list(driver_runs[0].inflight)]  # (called from the writer thread)
        ray.wait(refs, num_returns=len(refs), timeout=30, fetch_local=False)
        where = ray.experimental.get_object_locations(refs)
        held = {n: [r for r in refs if where[r]["node_ids"] == [n.node_id]]
                for n in cluster.worker_nodes}  # fmt: skip
        victim = max(held, key=lambda n: len(held[n]))  # the node holding most results alone
        lost.extend(held[victim])
        cluster.remove_node(victim, allow_graceful=False)

    out = tmp_path / "survivor.gguf"
    try:
        fd.convert(checkpoint, out, "f32", address=cluster.address, on_tensor=kill)
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    assert lost, "no result was held on the killed node only"
    assert out.read_bytes() == ref.read_bytes()
    assert not _leftovers(tmp_path)


def _random_imatrix(checkpoint: Path, path: Path) -> Path:
    """An importance matrix for every 2-D weight of `checkpoint` (random positive sums)."""
    from ferroquant.methods.imatrix_io import ImatrixEntry, ImportanceMatrix, write_imatrix

    rng = np.random.default_rng(1)
    im = ImportanceMatrix(datasets=["random"], chunk_count=3, chunk_size=64)
    for t in plan_hf_to_gguf(checkpoint, "q4_k_m").tensors:
        if len(t.shape) == 2 and "token_embd" not in t.gname:
            sums = rng.gamma(0.5, 1.0, (1, t.shape[1])).astype(np.float32) * 192
            im.entries[t.gname] = ImatrixEntry(sums, np.array([192.0], np.float32))
    write_imatrix(im, path)
    return path


@pytest.mark.cluster
def test_cli_imatrix_on_the_cluster_writes_the_same_file(cluster, checkpoint, reference, tmp_path):
    """`convert --imatrix FILE --ray`: each task gets its tensor's importance (row ranges too),
    and the file is the single machine's with the same imatrix, which is not the plain one."""
    im = _random_imatrix(checkpoint, tmp_path / "im.gguf")
    here, there = tmp_path / "here.gguf", tmp_path / "there.gguf"
    args = ["convert", str(checkpoint), "--qtype", "q4_k_m", "--imatrix", str(im), "--quiet"]
    assert cli.main([*args[:2], str(here), *args[2:]]) == 0
    import ferroquant.distributed as fd
    from ferroquant.methods.imatrix_io import read_imatrix

    assert cli.main([*args[:2], str(there), *args[2:], "--ray", cluster.address]) == 0
    assert here.read_bytes() == there.read_bytes() != reference
    split = tmp_path / "split.gguf"  # the large tensors as row ranges
    fd.convert(checkpoint, split, "q4_k_m", address=cluster.address, max_task_bytes=64 * 1024,
               imatrix=read_imatrix(im))  # fmt: skip
    assert split.read_bytes() == here.read_bytes()
