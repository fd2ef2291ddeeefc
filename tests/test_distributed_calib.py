"""Calibrated methods on a Ray cluster (`ferroquant.distributed.quantize_model`, `convert
--method gptq --ray`, `imatrix --ray`): the same bytes as on one machine.

The reference is the single-machine run on the same model and windows (tests/tiny_llama.py: two
layers, hidden 256, 4 query heads on 1 kv head). The windows are 10: a full shard of
`SHARD_WINDOWS` = 8 and a partial one, so the shard order of the sums is exercised. The cluster is
Ray's own `ray.cluster_utils.Cluster` on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as in
tests/test_distributed.py): a head without CPUs and two one-CPU worker nodes. Tests that start it
are marked `cluster`."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

# before Ray starts anything: loopback only, nothing sent out
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import tiny_llama  # noqa: E402
from tiny_llama import make_tiny_llama  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant import cli  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

WINDOWS, SEQ = 10, 32
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-ray"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))


# `cluster`: the local loopback Ray cluster fixture in tests/conftest.py


_qbytes = tiny_llama.quantized_bytes


# -- no cluster: the decomposition the cluster uses, computed here ------------------------------


def test_statistics_summed_by_shard_are_the_single_pass_bits(tiny):
    """The layer's statistics over all windows (one pass, shards of SHARD_WINDOWS inside) equal,
    bit for bit, those of each shard computed on its own and added in shard order, as the
    cluster's driver adds them; and they are the second moment of the Linears' inputs."""
    from ferroquant.calib.capture import (
        SHARD_WINDOWS,
        InputStats,
        collect_stats,
        find_decoder_layers,
        first_layer_inputs,
    )

    model = _model(tiny)
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, _ids())
        whole = collect_stats(layers[0], calls[0], hidden, "layer0")
        merged = InputStats(layers[0], "layer0")
        merged.remove()
        for k in range(0, WINDOWS, SHARD_WINDOWS):
            part = collect_stats(layers[0], calls[0], hidden[k : k + SHARD_WINDOWS], "layer0")
            merged.add_shard(part.sums, part.counts, part.group_of)
    assert SHARD_WINDOWS < WINDOWS and whole.group_of == merged.group_of
    assert whole.counts == merged.counts == [WINDOWS * SEQ] * len(whole.sums)
    for a, b in zip(whole.sums, merged.sums, strict=True):
        assert torch.equal(a, b)
    g = whole.group_of["self_attn.q_proj"]  # q's input: the input norm of the hidden states
    x = torch.cat([layers[0].input_layernorm(h).reshape(-1, h.shape[-1]) for h in hidden])
    torch.testing.assert_close(whole.sums[g], (x.T @ x).to(torch.float64), rtol=1e-5, atol=1e-3)


def test_the_shard_decomposition_is_what_makes_the_sums_agree():
    """Windows whose scales span 2^-30..2^30, so float64 sums of their float32 x^T x depend on
    the order of the additions: one pass (shards inside) equals each shard computed alone and the
    shards added in order, bit for bit; one running sum over all windows (what the capture did
    before the shards) does not."""
    from torch import nn

    from ferroquant.calib.capture import SHARD_WINDOWS, InputStats

    g = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 4))
    xs = [torch.randn(1, 8, 16, generator=g) * 2.0 ** int(torch.randint(-30, 30, (1,), generator=g))
          for _ in range(20)]  # fmt: skip

    def stats(windows, shard=SHARD_WINDOWS):
        st = InputStats(layer, "layer", shard_windows=shard)
        for x in windows:
            st.new_sample()
            layer(x)
        st.finish()
        st.remove()
        return st

    with torch.no_grad():
        whole, running = stats(xs), stats(xs, shard=len(xs))
        merged = InputStats(layer, "layer")
        merged.remove()
        for k in range(0, len(xs), SHARD_WINDOWS):
            part = stats(xs[k : k + SHARD_WINDOWS])
            merged.add_shard(part.sums, part.counts, part.group_of)
    assert torch.equal(whole.sums[0], merged.sums[0]) and whole.counts == merged.counts == [160]
    assert not torch.equal(running.sums[0], merged.sums[0])
    x = torch.cat(xs).reshape(-1, 16).to(torch.float64)
    ref = x.T @ x  # float32 products per window: off-diagonal cancellations, hence atol
    torch.testing.assert_close(merged.sums[0], ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    with pytest.raises(ValueError, match="share their inputs differently"):
        merged.add_shard(part.sums, part.counts, {"1": 0})


def test_what_the_cluster_does_not_run_is_refused_up_front(tiny, tmp_path):
    import ferroquant.distributed as fd

    model = _model(tiny)
    before = copy.deepcopy(model.state_dict())
    for method in ("rtn", "hqq"):
        with pytest.raises(ValueError, match="runs on one machine"):
            fd.quantize_model(model, "q4_0", method=method, calibration=_ids(), address="auto")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="runs on one machine"):
        fd.convert(tiny, tmp_path / "x.gguf", "q4_0", method="hqq", address="auto")
    with pytest.raises(ValueError, match="transfer: options of the rtn conversion"):
        fd.convert(tiny, tmp_path / "x.gguf", "q4_0", method="gptq", transfer="object-store")
    with pytest.raises(FileNotFoundError, match="no such calibration text"):
        fd.convert(tiny, tmp_path / "x.gguf", "q4_0", method="gptq", calibration=tmp_path / "no")
    argv = ["convert", str(tiny), str(tmp_path / "x.gguf"), "--qtype", "f16", "--method", "awq",
            "--ray", "127.0.0.1:1"]  # fmt: skip
    assert cli.main(argv) != 0
    assert not list(tmp_path.iterdir())


# -- on a local cluster --------------------------------------------------------------------------


@pytest.mark.cluster
def test_gptq_on_the_cluster_gives_the_single_machine_bytes(cluster, tiny):
    import ferroquant.distributed as fd

    model = _model(tiny)
    cfg = {"n_samples": WINDOWS, "seq_len": SEQ}
    here = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                             config=cfg, progress=False)  # fmt: skip
    there = fd.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                              config=cfg, progress=False, address=cluster.address)  # fmt: skip
    a, b = _qbytes(here), _qbytes(there)
    assert len(a) == 14 and a.keys() == b.keys()  # 7 Linears x 2 layers, the tied head kept
    assert {n: v[0] for n, v in a.items()} == {n: v[0] for n, v in b.items()}
    for n in a:
        assert a[n] == b[n], n
    assert there.ferroquant_plan == here.ferroquant_plan


@pytest.mark.cluster
@pytest.mark.parametrize("options", [{"asym_alpha": 0.25}, {"true_sequential": True},
                                     {"true_sequential": True, "asym_alpha": 0.25}])  # fmt: skip
def test_sequential_gptq_on_the_cluster_gives_the_single_machine_bytes(cluster, tiny, options):
    """GPTQ's own statistics per group (true-sequential's recomputed inputs, the asymmetric
    target's D against the float model's hidden states, which the cluster carries shard by shard
    in the object store next to the quantized ones): one task per shard, added in shard order,
    the same bytes as on one machine; and not plain GPTQ's bytes (the options did something)."""
    import ferroquant.distributed as fd

    model = _model(tiny)
    cfg = {"n_samples": WINDOWS, "seq_len": SEQ, **options}
    plain = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                              config={"n_samples": WINDOWS, "seq_len": SEQ, "asym_alpha": 0.0},
                              progress=False)  # fmt: skip
    here = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                             config=cfg, progress=False)  # fmt: skip
    there = fd.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                              config=cfg, progress=False, address=cluster.address)  # fmt: skip
    a, b = _qbytes(here), _qbytes(there)
    assert len(a) == 14 and a == b
    assert a != _qbytes(plain)
    for k, v in options.items():
        assert f"{k}={v}" in there.ferroquant_method


@pytest.mark.cluster
@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_on_the_cluster_gives_the_single_machine_bytes(cluster, tiny, method):
    """AWQ's searches run per shard (x_mean, the candidates' losses, the clip rows) and are added
    in window order: the same scales, clips, folded norms and bytes."""
    import ferroquant.distributed as fd

    model = _model(tiny)
    cfg = {"n_samples": WINDOWS, "seq_len": SEQ, "grid": 10, "clip_tokens": 100}
    here = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method=method, calibration=_ids(),
                             config=cfg, progress=False)  # fmt: skip
    there = fd.quantize_model(copy.deepcopy(model), "q4_k_m", method=method, calibration=_ids(),
                              config=cfg, progress=False, address=cluster.address)  # fmt: skip
    a, b = _qbytes(here), _qbytes(there)
    assert len(a) == 14 and a == b
    norms = [k for k in here.state_dict() if k.endswith("layernorm.weight")]
    assert len(norms) == 4
    for k in norms:  # the folded scales
        assert torch.equal(here.state_dict()[k], there.state_dict()[k]), k
    assert any(not torch.equal(here.state_dict()[k], model.state_dict()[k]) for k in norms)


@pytest.mark.cluster
def test_cli_convert_gptq_on_the_cluster_writes_the_same_file(cluster, tiny, text_file, tmp_path):
    here, there = tmp_path / "here.gguf", tmp_path / "there.gguf"
    argv = ["convert", str(tiny), "--qtype", "q4_k_m", "--method", "gptq", "--calib",
            str(text_file), "--calib-samples", str(WINDOWS), "--calib-len", str(SEQ),
            "--quiet"]  # fmt: skip
    assert cli.main([*argv[:2], str(here), *argv[2:]]) == 0
    assert cli.main([*argv[:2], str(there), *argv[2:], "--ray", cluster.address]) == 0
    assert here.read_bytes() == there.read_bytes()
    rtn = tmp_path / "rtn.gguf"
    assert cli.main(["convert", str(tiny), str(rtn), "--qtype", "q4_k_m", "--quiet"]) == 0
    assert rtn.read_bytes() != there.read_bytes()  # GPTQ did change the weights


@pytest.mark.cluster
def test_imatrix_on_the_cluster_gives_the_same_file(cluster, tiny, text_file, tmp_path):
    here, there = tmp_path / "here.gguf", tmp_path / "there.gguf"
    argv = ["imatrix", str(tiny), "--text", str(text_file), "--ctx", "32", "--chunks", "6",
            "--quiet"]  # fmt: skip
    assert cli.main([*argv, "-o", str(here)]) == 0
    assert cli.main([*argv, "-o", str(there), "--ray", cluster.address]) == 0
    assert here.read_bytes() == there.read_bytes()
    from ferroquant.methods.imatrix_io import read_imatrix

    im = read_imatrix(there)
    assert im.chunk_count == 6 and len(im.entries) == 14


@pytest.mark.cluster
def test_a_task_s_error_names_the_layer(cluster, tiny):
    import ferroquant.distributed as fd

    model = _model(tiny)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    cfg = {"n_samples": WINDOWS, "seq_len": SEQ}
    where = r"non-finite activations at the input of model\.layers\.1\.mlp"
    with pytest.raises(ValueError, match=where):
        fd.quantize_model(model, "q4_0", calibration=_ids(), config=cfg, progress=False)


@pytest.mark.cluster
def test_killed_worker_node_mid_gptq_gives_the_same_bytes(cluster, tiny):
    """When layer 1's statistics tasks are handed out, the worker node holding most of layer 1's
    input shards (layer 0's outputs, only in that node's object store) is killed: Ray rebuilds
    the lost shards from their lineage (layer 0's output tasks run again on the other node) and
    runs the tasks that were sent to the dead node again. Every task is a pure function of its
    arguments, so the bytes are the single machine's. A fresh node then takes the dead one's
    place."""
    ray = pytest.importorskip("ray")
    from ferroquant.distributed import calibrated

    lost: list = []

    class KillFirst:
        """`stats_task` that kills the node before layer 1's first statistics task."""

        def __init__(self, runner, task):
            self.runner, self.task = runner, task

        def remote(self, *args):
            if args[-1] == "model.layers.1" and not lost:
                refs = list(self.runner.inputs)
                ray.wait(refs, num_returns=len(refs), timeout=60, fetch_local=False)
                where = ray.experimental.get_object_locations(refs)
                held = {n: [r for r in refs if where[r]["node_ids"] == [n.node_id]]
                        for n in cluster.worker_nodes}  # fmt: skip
                victim = max(held, key=lambda n: len(held[n]))
                lost.extend(held[victim])
                cluster.remove_node(victim, allow_graceful=False)
            return self.task.remote(*args)

    model = _model(tiny)
    cfg = {"n_samples": WINDOWS, "seq_len": SEQ}
    here = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=_ids(),
                             config=cfg, progress=False)  # fmt: skip
    there = copy.deepcopy(model)
    runner = calibrated.RayRunner(ray)
    runner.stats_task = KillFirst(runner, runner.stats_task)
    try:
        fq.quantize_model(there, "q4_k_m", method="gptq", calibration=_ids(), config=cfg,
                          progress=False, runner=runner)  # fmt: skip
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    assert lost, "no input shard was held on the killed node only"
    a, b = _qbytes(here), _qbytes(there)
    assert len(a) == 14 and a == b


_GPTQ_DRIVER = """
import os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ferroquant.distributed as fd
from ferroquant.distributed import layer_journal
save = layer_journal.LayerJournal.save
def slow(self, index, layer, *inputs):
    save(self, index, layer, *inputs)
    print(index, flush=True)
    time.sleep(60)  # killed here
layer_journal.LayerJournal.save = slow
src, out, text, address, windows, seq, method, alpha = sys.argv[1:9]
config = {"asym_alpha": float(alpha)} if alpha != "-" else None
fd.convert(src, out, "q4_k_m", method=method, calibration=text, n_samples=int(windows),
           seq_len=int(seq), address=address, config=config)
"""


@pytest.mark.cluster
@pytest.mark.parametrize(("method", "alpha"), [("gptq", "-"), ("awq", "-"), ("gptq", "0")])
def test_killed_calibrated_driver_leaves_no_file_and_resume_gives_the_same_bytes(
    cluster, tiny, text_file, tmp_path, caplog, method, alpha
):
    """A driver killed after the first layer leaves no output file, only the side folder (the
    finished layer, AWQ's folds included, the next layer's inputs, and with GPTQ's asymmetric
    target (the default; `alpha` "-": the method's defaults) the float model's hidden states
    too); `resume=True` continues at layer 1 and writes the single machine's file; the folder is
    removed on success."""
    import signal
    import subprocess
    import sys

    import ferroquant.distributed as fd
    from ferroquant.distributed.layer_journal import layers_path

    here = tmp_path / "here.gguf"
    argv = ["convert", str(tiny), str(here), "--qtype", "q4_k_m", "--method", method, "--calib",
            str(text_file), "--calib-samples", str(WINDOWS), "--calib-len", str(SEQ),
            "--quiet"]  # fmt: skip
    config = {"asym_alpha": float(alpha)} if alpha != "-" else None
    if config is None:
        assert cli.main(argv) == 0
    else:  # what `convert --method gptq` runs here, with the option the CLI does not take
        from ferroquant.methods import method_config
        from ferroquant.models.calibrated import calibrated_tensors
        from ferroquant.models.convert import hf_to_gguf

        cfg = method_config(method, config, n_samples=WINDOWS, seq_len=SEQ)
        tensors = calibrated_tensors(tiny, "q4_k_m", method, cfg, text_file, progress=False)
        hf_to_gguf(tiny, here, "q4_k_m", tensors=tensors)
    out = tmp_path / "killed.gguf"
    p = subprocess.Popen([sys.executable, "-c", _GPTQ_DRIVER, str(tiny), str(out), str(text_file),
                          cluster.address, str(WINDOWS), str(SEQ), method, alpha],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "0"  # layer 0 finished and kept
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait(timeout=60)
    side = layers_path(out)
    assert not out.exists()
    from ferroquant.methods import GPTQConfig

    asym = float(alpha) if alpha != "-" else GPTQConfig().asym_alpha
    carried = ["float-inputs-00001.pt"] if method == "gptq" and asym > 0 else []
    assert sorted(f.name for f in side.iterdir()) == [*carried, "inputs-00001.pt",
                                                      "layer-00000.pt", "state.json"]  # fmt: skip
    caplog.set_level("INFO", logger="ferroquant.distributed")
    with pytest.raises(ValueError, match="belongs to another conversion"):  # other windows
        fd.convert(tiny, out, "q4_k_m", method=method, calibration=text_file, n_samples=WINDOWS,
                   seq_len=SEQ + 1, address=cluster.address, resume=True,
                   config=config)  # fmt: skip
    assert not out.exists() and side.is_dir()
    fd.convert(tiny, out, "q4_k_m", method=method, calibration=text_file, n_samples=WINDOWS,
               seq_len=SEQ, address=cluster.address, resume=True, config=config)  # fmt: skip
    assert out.read_bytes() == here.read_bytes()
    assert not side.exists()
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert resumed == [f"resuming: 1 layers finished in {side}"], resumed
