"""ferroquant.offload: budget parsing, the placement policy (a pure function), accelerate's size
accounting and hooks as offload uses them on QuantLinear models, and the CPU-only behaviour.

This machine has no GPU: the policy is tested with a "cuda:0" name it never touches and with
the "meta" device standing in for the GPU, the hooks with a block placed on "meta" (accelerate's
hook must hand it meta activations: hidden states, the (cos, sin) position embeddings, the mask)
and with explicit all-CPU device maps (hooks installed, results identical). The GPU itself runs
ferroquant's CUDA op (ferroquant/cuda/qmatmul.py, tested where a GPU is)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from peers import require  # noqa: E402

require("accelerate")
import accelerate.hooks  # noqa: E402
from accelerate.utils import compute_module_sizes  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant.cuda import CudaUnavailable  # noqa: E402
from ferroquant.models import offloading as off  # noqa: E402
from ferroquant.nn import QuantLinear  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """A random 4-layer Llama (tied embeddings, GQA), q8_0, plus its prompt."""
    require("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    fq.quantize_model(model, "q8_0", progress=False)
    ids = torch.tensor([[1, 17, 33, 99, 5, 64]])
    return model, ids


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a machine without a GPU (on a GPU machine, ferroquant.cuda is told so)."""
    if torch.cuda.is_available():
        from ferroquant.cuda import nvrtc as fqcuda

        def check_device(device=None):
            raise CudaUnavailable("no CUDA device (torch.cuda.is_available() is False)")

        monkeypatch.setattr(fqcuda, "check_device", check_device)
        monkeypatch.setattr(fqcuda, "available", lambda device=None: False)


def _generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize(
    "text, want",
    [("4GiB", 4 * 1024**3), ("4GB", 4 * 10**9), ("512 MiB", 512 * 1024**2), ("1.5GB", 15 * 10**8),
     ("0", 0), (123456, 123456), ("100b", 100), ("2tib", 2 * 1024**4)],
)  # fmt: skip
def test_budgets_parse(text, want):
    assert off.parse_memory(text) == want


@pytest.mark.parametrize("bad", ["4 gigs", "GiB", "-1GB", "4GiB5", "", -3, True, "1e9"])
def test_a_budget_that_does_not_parse_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="max_gpu_memory"):
        off.parse_memory(bad)


def test_policy_fills_the_gpu_in_order_then_the_cpu():
    layers = [(f"model.layers.{i}", 100) for i in range(5)]
    others = [("model.embed_tokens", 1000), ("lm_head", 1000)]
    got = dict(off.plan_placement(layers, others, 250, "cuda:0"))
    assert [got[f"model.layers.{i}"] for i in range(5)] == ["cuda:0"] * 2 + ["cpu"] * 3
    assert got["model.embed_tokens"] == got["lm_head"] == "cpu"
    # exactly full, and a layer too big stops the filling (no later layer jumps over it)
    got = dict(off.plan_placement([("a", 100), ("b", 300), ("c", 10)], [], 400, "cuda:1"))
    assert got == {"a": "cuda:1", "b": "cuda:1", "c": "cpu"}
    got = dict(off.plan_placement([("a", 100), ("b", 300), ("c", 10)], [], 350, "cuda:0"))
    assert got == {"a": "cuda:0", "b": "cpu", "c": "cpu"}
    for budget, gpu in ((0, "cuda:0"), (10**12, None)):
        assert {d for _, d in off.plan_placement(layers, others, budget, gpu)} == {"cpu"}


def test_units_and_bytes_of_a_hugging_face_model(tiny):
    model, _ = tiny
    units = off.units(model)
    names = [n for n, _ in units]
    assert names == ["model.embed_tokens", *[f"model.layers.{i}" for i in range(4)],
                     "model.norm", "model.rotary_emb", "lm_head"]  # fmt: skip
    assert [n for n, k in units if k == "layer"] == names[1:5]
    sizes = off.unit_bytes(model, names)
    layer = model.model.layers[0]
    want = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    q = layer.self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.qweight.numel() == 64 * 64 // 32 * 34
    assert sizes["model.layers.0"] == want > q.qweight.numel()
    # the tied head shares the embedding's weight: counted once, with the embedding
    assert sizes["model.embed_tokens"] == 160 * 64 * 4 and sizes["lm_head"] == 0
    # a model without a layer list: its top-level children
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert off.units(seq) == [("0", "other"), ("1", "other")]


def test_without_a_gpu_everything_stays_on_the_cpu_without_hooks(tiny, no_gpu):
    model, ids = tiny
    want = _generate(model, ids)
    m = copy.deepcopy(model)
    plan = fq.offload(m, max_gpu_memory="4GiB")
    assert plan.gpu is None and "no usable CUDA device" in plan.note and "CPU" in plan.note
    assert {p.device for p in plan.placements} == {"cpu"} and not plan.handles
    assert not any(mod._forward_pre_hooks for mod in m.modules())
    text = str(plan)
    assert "model.layers.3" in text and "cpu" in text and "total on cpu" in text
    assert plan.bytes_on("cpu") == sum(p.nbytes for p in plan.placements) > 0
    got = _generate(m, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fq.offload(m, "4GiB", device="cpu").note.startswith("device='cpu': every module")


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny, no_gpu):
    model, _ = tiny
    m = copy.deepcopy(model)
    with pytest.raises(CudaUnavailable, match="offload to cuda:0 requested"):
        fq.offload(m, "1GiB", device="cuda")
    with pytest.raises(CudaUnavailable, match="cuda:1"):
        fq.offload(m, {"model.layers.1": 1})
    with pytest.raises(ValueError, match="not a torch device"):
        fq.offload(m, {"model.layers.1": "gpu please"})
    with pytest.raises(ValueError, match=r"does not have: \['model.layers.9'\]"):
        fq.offload(m, {"model.layers.9": "cpu"})
    with pytest.raises(ValueError, match="once"):
        fq.offload(m, {"lm_head": "cpu"}, device_map={"lm_head": "cpu"})
    assert next(m.parameters()).device.type == "cpu"  # nothing moved


def test_a_device_map_splitting_tied_weights_is_refused(tiny):
    model, _ = tiny
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="tied"):
        fq.offload(m, {"lm_head": "meta"})
    assert not m.lm_head.weight.is_meta


def test_hooks_with_an_all_cpu_device_map_keep_generation_identical(tiny, monkeypatch):
    model, ids = tiny
    want = _generate(model, ids)
    m = copy.deepcopy(model)
    seen: list[tuple[str, list[str]]] = []
    real = accelerate.hooks.send_to_device

    def spy(obj, device, **kwargs):
        if isinstance(obj, dict) and "position_embeddings" in obj:
            seen.append((device, sorted(obj)))
        return real(obj, device, **kwargs)

    monkeypatch.setattr(accelerate.hooks, "send_to_device", spy)
    plan = fq.offload(m, {"model.layers.0": "cpu", "model.layers.2": "cpu", "": "cpu"})
    assert plan.handles and plan.note.startswith("device map")
    assert [p.name for p in plan.placements][:5] == [
        "model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
        "model.layers.3"]  # fmt: skip
    got = _generate(m, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # every layer's pre-hook moved its kwargs: the cache, the mask and the position embeddings
    assert len(seen) == 4 * 6  # 4 layers, 6 forward passes (prompt + 5 decode steps)
    assert all("past_key_values" in keys and "position_embeddings" in keys for _, keys in seen)
    plan.remove()
    assert not any(mod._forward_pre_hooks or hasattr(mod, "_hf_hook") for mod in m.modules())


def test_a_block_on_another_device_receives_its_activations_there(tiny):
    """Layer 2 on "meta": its pre-hook must hand it meta hidden states, meta (cos, sin) and a
    meta mask (if any); a test hook then returns real values so the CPU layers can go on."""
    model, ids = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        want = m(ids).logits
    cpu_out: dict[str, torch.Tensor] = {}
    got: dict[str, object] = {}
    m.model.layers[2].register_forward_pre_hook(
        lambda mod, args: cpu_out.__setitem__("h", args[0].detach().clone())
    )  # registered before offload's hook: sees the CPU input
    plan = fq.offload(m, {"model.layers.2": "meta"})
    assert m.model.layers[2].self_attn.q_proj.qweight.is_meta
    assert plan.devices()["model.layers.2"] == "meta" and plan.devices()["model.layers.3"] == "cpu"

    # accelerate's hook moves the inputs inside the layer's forward: look at what its first
    # modules receive
    layer = m.model.layers[2]
    layer.input_layernorm.register_forward_pre_hook(
        lambda mod, args: got.__setitem__("h", args[0].device.type)
    )
    layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: got.__setitem__(
            "pe", [t.device.type for t in kwargs["position_embeddings"]]
        ),
        with_kwargs=True,
    )

    def record(mod, args, out):
        got["out"] = out.device.type
        return cpu_out["h"]  # identity layer on the CPU from here on

    layer.register_forward_hook(record)
    with torch.no_grad():
        logits = m(ids).logits
    assert got == {"h": "meta", "pe": ["meta", "meta"], "out": "meta"}
    assert logits.device.type == "cpu" and logits.shape == want.shape
    assert not torch.equal(logits, want)  # layer 2 was skipped, the rest ran
    # offloading again re-plans from scratch: the old hooks go, the new map is applied
    plan2 = fq.offload(m, {"model.layers.1": "meta", "model.layers.2": "meta"})
    assert not plan.handles and plan2.handles and m.ferroquant_offload is plan2
    assert m.model.layers[1].mlp.up_proj.qweight.is_meta
    assert m.model.layers[3].mlp.up_proj.qweight.device.type == "cpu"


def test_hooks_move_nested_tensors_and_pass_caches_through():
    """accelerate's send_to_device, as offload's hooks call it: tensors in tuples, lists, dicts
    and ModelOutputs move, Hugging Face caches and everything else arrive unchanged, and a
    tensor already on the unit's device is not copied."""
    require("transformers")
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    got: dict[str, object] = {}

    class Record(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key, self.lin = key, nn.Linear(2, 2)

        def forward(self, obj):
            got[self.key] = obj
            return torch.zeros(1)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.there, self.here = Record("there"), Record("here")

        def forward(self, obj):
            self.here(obj["list"][0])
            return self.there(obj=obj)

    cache = DynamicCache()
    a, b = torch.ones(2), torch.zeros(3)
    obj = {"pe": (a, b), "list": [a, 3, "x"], "cache": cache, "none": None,
           "out": BaseModelOutputWithPast(last_hidden_state=a, past_key_values=cache)}  # fmt: skip
    toy = Toy()
    fq.offload(toy, {"there": "meta"})
    assert toy(obj).device.type == "cpu"  # the model's output comes back to the inputs' device
    moved = got["there"]
    assert [t.device.type for t in moved["pe"]] == ["meta", "meta"]
    assert moved["list"][0].is_meta and moved["list"][1:] == [3, "x"]
    assert moved["cache"] is cache and moved["none"] is None
    assert moved["out"].last_hidden_state.is_meta and moved["out"].past_key_values is cache
    assert got["here"] is a  # already there: no copy


def test_accelerate_counts_quantlinear_at_its_stored_size():
    """compute_module_sizes (which sizes every unit) sees the packed buffers, which are not
    parameters: nf4 64x64 = 2048 bytes of codes + 64 float32 absmax + the float32 bias; a bf16
    cast leaves the statistics float32 and halves the bias only."""
    q = QuantLinear.from_linear(nn.Linear(64, 64), "nf4")
    assert compute_module_sizes(q)[""] == 64 * 64 // 2 + 64 * 4 + 64 * 4
    assert compute_module_sizes(q.to(torch.bfloat16))[""] == 64 * 64 // 2 + 64 * 4 + 64 * 2


def test_the_budget_is_spent_on_quantized_bytes_not_float_ones(tiny):
    """The automatic plan on the "meta" device (a stand-in GPU): a budget of exactly two
    quantized layers puts two layers there, though one float32 layer alone would not fit."""
    from ferroquant.models.gguf_model import dequantize_model

    model, _ = tiny
    m = copy.deepcopy(model)
    layer = off.unit_bytes(m, ["model.layers.0"])["model.layers.0"]
    floats = dequantize_model(copy.deepcopy(model))
    float_layer = off.unit_bytes(floats, ["model.layers.0"])["model.layers.0"]
    assert 3 * layer < float_layer  # q8_0: 34 bytes per 32 weights against 4 bytes per weight
    plan = fq.offload(m, max_gpu_memory=2 * layer, device="meta")
    assert [p.device for p in plan.placements if p.kind == "layer"] == ["meta"] * 2 + ["cpu"] * 2
    assert plan.bytes_on("meta") == 2 * layer and plan.note.startswith("2 of 4 layers on meta")
    assert m.model.layers[1].mlp.down_proj.qweight.is_meta
    assert not m.model.embed_tokens.weight.is_meta
    assert fq.offload(floats, 2 * layer, device="meta").bytes_on("meta") == 0


def test_a_cache_filled_before_offloading_follows_each_layer(tiny):
    """Entries of a layer now on another device are moved once, before that layer runs; the
    other layers' entries stay where they are."""
    from transformers import DynamicCache

    model, ids = tiny
    m = copy.deepcopy(model)
    cache = DynamicCache()
    with torch.no_grad():
        m(ids, past_key_values=cache, use_cache=True)
    cpu_in: dict[str, torch.Tensor] = {}
    layer = m.model.layers[2]
    layer.register_forward_pre_hook(lambda mod, args: cpu_in.__setitem__("h", args[0]))
    fq.offload(m, {"model.layers.2": "meta"})
    layer.register_forward_hook(lambda mod, args, out: cpu_in["h"])  # identity on the CPU
    with torch.no_grad():
        m(ids[:, -1:], past_key_values=cache, use_cache=True)
    assert [lay.keys.device.type for lay in cache.layers] == ["cpu", "cpu", "meta", "cpu"]
    assert [lay.keys.shape[-2] for lay in cache.layers] == [ids.shape[1] + 1] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_across_a_real_gpu_generates_like_the_cpu(tiny):
    """The first two layers on the GPU (bf16 activations: ferroquant's CUDA kernels), the rest
    on the CPU. bf16 rounds each activation to 2^-8 relative; through 4 layers on a random
    model the logits stay within a few percent of the CPU model's."""
    model, ids = tiny
    cpu = copy.deepcopy(model).to(torch.bfloat16)
    m = copy.deepcopy(model).to(torch.bfloat16)
    two = sum(off.unit_bytes(m, ["model.layers.0", "model.layers.1"]).values())
    plan = fq.offload(m, max_gpu_memory=two)
    assert [p.device for p in plan.placements if p.kind == "layer"] == ["cuda:0"] * 2 + ["cpu"] * 2
    assert m.model.layers[0].self_attn.q_proj.qweight.is_cuda
    seq, _ = _generate(m, ids)
    assert seq.device.type == "cpu" and seq.shape == (1, ids.shape[1] + 6)
    with torch.no_grad():
        logits, want = m(ids).logits, cpu(ids).logits
    assert logits.device.type == "cpu"
    assert (logits.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max() + 0.05
