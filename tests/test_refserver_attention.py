"""Paged attention reads K/V through block tables and must equal plain dense causal attention;
the Triton decode kernel must equal the torch reference (under TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # as the server runs: OpenMP threads spin when the cores are shared

from refserver.attention import build_metadata, paged_attention, write_kv  # noqa: E402

BLOCK = 16
H, KVH, D = 8, 2, 32


def dense_causal(q, k, v, start):
    """Reference: queries at positions start.. over keys 0..; GQA by repeating kv heads."""
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def scattered_tables(lengths, num_blocks, gen):
    """Block tables of random, disjoint, out-of-order blocks: nothing contiguous to lean on."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(order[:need])
        order = order[need:]
    return tables


@pytest.mark.parametrize(
    "lengths,query_lens",
    [
        ([1, 17, 40, 100], [1, 1, 1, 1]),  # decode
        ([33, 16, 70], [33, 16, 70]),  # whole prefill
        ([50, 20, 90], [18, 20, 5]),  # prefill after a cached prefix / chunked prefill
        ([17, 40, 70, 5], [1, 1, 30, 5]),  # a step that mixes decodes and prefill chunks
        ([5, 300, 20, 700, 33], [1, 1, 1, 1, 1]),  # decodes of far apart lengths: several groups
    ],
)
def test_paged_attention_equals_dense(lengths, query_lens):
    gen = torch.Generator().manual_seed(0)
    num_blocks = 128
    k_cache = torch.zeros(num_blocks, BLOCK, KVH, D)
    v_cache = torch.zeros(num_blocks, BLOCK, KVH, D)
    tables = scattered_tables(lengths, num_blocks, gen)
    ks = [torch.randn(n, KVH, D, generator=gen) for n in lengths]
    vs = [torch.randn(n, KVH, D, generator=gen) for n in lengths]
    # The context before this step is already in the cache; the step writes its own tokens.
    for table, k, v, n, q in zip(tables, ks, vs, lengths, query_lens):
        if n > q:
            earlier = build_metadata([table], [n - q], [n - q], BLOCK)
            write_kv(k_cache, v_cache, earlier.slot_mapping, k[: n - q], v[: n - q])
    meta = build_metadata(tables, lengths, query_lens, BLOCK)
    write_kv(
        k_cache,
        v_cache,
        meta.slot_mapping,
        torch.cat([k[n - q :] for k, n, q in zip(ks, lengths, query_lens)]),
        torch.cat([v[n - q :] for v, n, q in zip(vs, lengths, query_lens)]),
    )
    qs = [torch.randn(q, H, D, generator=gen) for q in query_lens]
    out = paged_attention(torch.cat(qs), k_cache, v_cache, meta, D**-0.5)
    expected = torch.cat([dense_causal(q, k, v, n - len(q)) for q, k, v, n in zip(qs, ks, vs, lengths)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_model_output_does_not_depend_on_block_placement():
    """The whole decoder through the paged cache: same logits whatever blocks the sequence got."""
    from refserver.config import ModelConfig
    from refserver.model import TinyLlama

    cfg = ModelConfig()
    model = TinyLlama(cfg, 256).eval()
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    logits = []
    for table in ([0, 1, 2], [7, 3, 5]):
        shape = (cfg.n_layers, 8, BLOCK, cfg.n_kv_heads, cfg.head_dim)
        kc, vc = torch.zeros(shape), torch.zeros(shape)
        with torch.inference_mode():
            meta = build_metadata([table], [30], [30], BLOCK)
            model(tokens[:30], torch.arange(30), kc, vc, meta, torch.tensor([29]))
            meta = build_metadata([table], [40], [10], BLOCK)
            logits.append(model(tokens[30:], torch.arange(30, 40), kc, vc, meta, torch.tensor([9])))
    torch.testing.assert_close(logits[0], logits[1])


TRITON_CHECK = textwrap.dedent("""
    import torch
    from refserver.attention import build_metadata, paged_attention
    from refserver import triton_attention
    gen = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(64, 16, 2, 32, generator=gen), torch.randn(64, 16, 2, 32, generator=gen)
    lengths = [1, 5, 16, 17, 37, 100]          # block tables of 1 to 7 blocks: one decode group
    order = torch.randperm(64, generator=gen).tolist()
    tables = []
    for n in lengths:
        tables.append(order[:-(-n // 16)]); order = order[-(-n // 16):]
    meta = build_metadata(tables, lengths, [1] * len(lengths), 16)
    q = torch.randn(len(lengths), 8, 32, generator=gen)
    ref = paged_attention(q, kc, vc, meta, 32 ** -0.5)
    (group,) = meta.decodes
    out = triton_attention.paged_decode(q, kc, vc, group.block_tables, group.context_lens, 32 ** -0.5)
    print("max_abs_diff", (ref - out).abs().max().item())
""")


def test_triton_decode_kernel_matches_reference_in_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the kernel is CUDA-only otherwise")
    cp = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert cp.returncode == 0, cp.stderr[-2000:]
    diff = float(cp.stdout.split("max_abs_diff")[1])
    assert diff < 1e-5  # fp32 in the interpreter; on a GPU (bf16 cache) the bar is 2e-2


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_decode_kernel_compiles_for_an_h100():
    """No GPU here, but Triton's bundled ptxas builds the kernel for sm_90 as it would on one."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from refserver.triton_attention import _paged_decode_kernel as kernel

    constexprs = {"GROUP": H // KVH, "BLOCK_SIZE": BLOCK, "HEAD_DIM": D}
    tensors = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*bf16" if name in tensors else "*i32"
        return "fp32" if name == "scale" else "i32"

    source = ASTSource(fn=kernel, signature={n: arg_type(n) for n in kernel.arg_names}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
