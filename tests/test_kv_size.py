"""`ferroquant kv-size` and ferroquant.kv's size formula (no torch needed)."""

from __future__ import annotations

import json

import pytest

from ferroquant.cli import main
from ferroquant.cli.kv_size import parse_tokens
from ferroquant.kv import kv_bytes_per_token, kv_cache_bytes

import peers

SMOL = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
}


def test_smollm2_f16_is_23040_bytes_per_token() -> None:
    # the number: 30 layers x 2 x 3 KV heads x 64 x 2 bytes
    assert kv_bytes_per_token(SMOL, "f16") == 23_040
    assert kv_bytes_per_token(SMOL, "f32") == 46_080
    assert kv_bytes_per_token(SMOL, "q8_0") == 23_040 * 34 // 64
    assert kv_bytes_per_token(SMOL, "int4") == 23_040 * 18 // 64 == 6480  # the runtime's


def test_llama3_8b_f16_is_128_kib_per_token() -> None:
    llama3 = {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
    }
    assert kv_bytes_per_token(llama3, "f16") == 128 * 1024
    assert kv_cache_bytes(llama3, "f16", parse_tokens("2M")) == 256 * 1024**3  # the 256 GiB


def test_kivi_residual_counts_at_the_model_dtype() -> None:
    per = kv_bytes_per_token(SMOL, "int4")
    assert kv_cache_bytes(SMOL, "int4", 64) == 64 * per
    assert kv_cache_bytes(SMOL, "int4", 70) == 64 * per + 6 * 23_040
    assert kv_cache_bytes(SMOL, "int4", 70, residual_bytes=4) == 64 * per + 6 * 46_080
    assert kv_cache_bytes(SMOL, "q4_0", 70) == 70 * kv_bytes_per_token(SMOL, "q4_0")


@pytest.mark.parametrize(
    "text,n", [("4096", 4096), ("128K", 131072), ("2M", 2 * 1024**2), ("1.5k", 1536)]
)
def test_parse_tokens(text: str, n: int) -> None:
    assert parse_tokens(text) == n


def test_cli_on_the_shipped_gguf(capsys) -> None:
    path = peers.smollm2_gguf()
    assert main(["kv-size", str(path), "--tokens", "2M", "--kv", "f16,int4", "q8_0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["kv_type"]: r for r in out["rows"]}
    assert list(rows) == ["f16", "int4", "q8_0"]
    assert rows["f16"]["bytes_per_token"] == 23_040
    assert rows["f16"]["total_bytes"] == 23_040 * 2 * 1024**2
    assert main(["kv-size", str(path), "--tokens", "4K", "--kv", "all"]) == 0
    table = capsys.readouterr().out
    assert "int2" in table and "23,040" in table


def test_cli_on_a_config_json(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    assert main(["kv-size", str(tmp_path), "--tokens", "64", "--kv", "int4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["total_bytes"] == 64 * 6_480


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kv", "int3"], "unknown kv_type 'int3'"),
        (["--tokens", "2X"], "--tokens: expected a count"),
        (["--tokens", "0.5"], "not a whole number"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    assert main(["kv-size", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_files(tmp_path, capsys) -> None:
    assert main(["kv-size", str(tmp_path / "missing.gguf")]) == 2
    assert "no such model or config" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text(
        json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 200})
    )
    assert main(["kv-size", str(bad)]) == 2
    assert "head_dim 50 is not a multiple of 32" in capsys.readouterr().err
    bad.write_text("not json")
    assert main(["kv-size", str(bad)]) == 2
    assert "not a GGUF file nor a JSON config" in capsys.readouterr().err


def test_python_sizes_equal_the_runtimes() -> None:
    """kv-size (types.py, numpy-free) and the native runtime's pool state the same bytes per token
    for every type at SmolLM2's shape (head_dim 64: KIVI groups of 64 in both)."""
    from ferroquant import _native
    from ferroquant.kv.types import KV_TYPES

    for name in KV_TYPES:
        assert kv_bytes_per_token(SMOL, name) == _native.kv_bytes_per_token(name, 30, 3, 64), name


def test_kivi_group_is_64_where_head_dim_allows() -> None:
    from ferroquant.kv.types import kivi_group

    assert kivi_group(64) == 64 and kivi_group(128) == 64 and kivi_group(96) == 32
    # 100 tokens at group 64: 64 quantized, 36 in the residual (at group 32 it would be 96 and 4)
    per = kv_bytes_per_token(SMOL, "int4")
    assert kv_cache_bytes(SMOL, "int4", 100) == 64 * per + 36 * 23_040
    head96 = {"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 96}
    assert kv_bytes_per_token(head96, "int4") == 2 * 3 * 20  # group 32: 20 bytes per 32 values
    assert kv_bytes_per_token(head96, "int2") == 2 * 3 * 12


def test_cli_states_the_int2_per_sequence_constant(capsys) -> None:
    """int2's 4 sinks and 128-token window: a per-sequence constant in f16, beside the
    quantized bytes per token (2M tokens: 132 full-precision tokens, 23,040 B each)."""
    from ferroquant.kv import kv_full_precision_tokens

    path = peers.smollm2_gguf()
    assert main(["kv-size", str(path), "--tokens", "2M", "--kv", "int2,int4", "--json"]) == 0
    rows = {r["kv_type"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    n = 2 * 1024**2
    assert rows["int2"]["full_precision_tokens"] == 132 == kv_full_precision_tokens(SMOL, "int2", n)
    assert rows["int2"]["full_precision_bytes"] == 132 * 23_040
    assert rows["int2"]["total_bytes"] == (n - 128) * 3600 + 132 * 23_040
    assert rows["int4"]["total_bytes"] == n * 6480 and rows["int4"]["full_precision_tokens"] == 0
    # the window options: none gives int2's plain rules (every whole group quantized)
    args = ["kv-size", str(path), "--tokens", "2M", "--kv", "int2", "--json"]
    assert main([*args, "--kv-sinks", "0", "--kv-residual", "0"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["total_bytes"] == n * 3600 and row["full_precision_tokens"] == 0
    assert main([*args, "--kv-sinks", "64"]) == 2
    assert "kv_sinks 64 must be smaller than the KIVI group" in capsys.readouterr().err
