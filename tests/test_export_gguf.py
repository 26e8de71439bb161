"""GGUF export of quantized tiny Llamas: the file dequantizes (gguf's own reader) to the toolkit's weights
(exactly for Q4_0/Q8_0; Q4_1 up to the fp16 rounding of its float zero m = -z s, counted), and
transformers' GGUF loader computes the same logits."""
import copy

import numpy as np
import pytest
import torch

import triton_kernels.nn  # noqa: F401  (kernels decorated under conftest's TRITON_INTERPRET=1)
from experiments.methods.compress import compress_model
from experiments.io.export_gguf import export_gguf, gguf_type_for
from tests.test_compress import tiny_llama

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


CASES = [  # (spec, GGUF type)
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "Q4_0"),
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, "Q4_1"),
    ({"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}, "Q8_0"),
    ({"method": "gptq", "bits": 3, "group_size": 64, "symmetric": True}, "Q4_0"),   # 3-bit codes shifted into Q4_0; partial last group of 32
    ({"method": "rtn", "bits": 2, "group_size": -1, "symmetric": False}, "Q4_1"),   # per-channel: every block of a row shares d, m
    ({"method": "rtn", "bits": 6, "group_size": 64, "symmetric": True}, "Q8_0"),
    ({"method": "hqq", "bits": 4, "group_size": 32}, "Q4_1"),   # fractional zeros: Q4_1's m = -z s holds them
    # mixed precision: 2- and 4-bit asymmetric layers with groups of 32 or 64, each layer written as Q4_1
    ({"method": "mixed", "budget": 3.5, "bit_choices": [2, 4], "group_choices": [32, 64]}, "Q4_1"),
]
IDS = ["q4_0", "q4_1", "q8_0", "w3-g64-sym", "w2-pc-asym", "w6-g64-sym", "hqq-w4-g32", "mixed-w2-w4"]


def _quantized(spec):
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    compress_model(model, spec, calib, progress=False)
    return model


def _rope_rows(n_rows, n_head):
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(w, dtype=np.float32)).reshape(
            [int(d) for d in reversed(t.shape.tolist())]))
    return out


def _toolkit_layers(model):
    """GGUF name -> (QuantLinear, row permutation or None)."""
    out = {}
    for i, b in enumerate(model.model.layers):
        for hf, g in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down")):
            mod = b.get_submodule(hf)
            rows = None
            if g in ("attn_q", "attn_k"):
                rows = _rope_rows(mod.out_features, 4 if g == "attn_q" else 2)
            out[f"blk.{i}.{g}.weight"] = (mod, rows)
    return out


@pytest.mark.parametrize("spec, qtype", CASES, ids=IDS)
def test_file_dequantizes_to_the_toolkit_weights(tmp_path, spec, qtype):
    model = _quantized(spec)
    report = export_gguf(model, tmp_path / "m.gguf")
    tensors = _read(tmp_path / "m.gguf")
    layers = _toolkit_layers(model)
    inexact_groups = 0
    for name, (mod, rows) in layers.items():
        got_type, got = tensors[name]
        assert got_type == qtype == report["tensors"][name]
        want = mod.dequantize()
        if rows is not None:
            want = want[rows]
        if qtype != "Q4_1":
            assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max():.3g}"
            continue
        # Q4_1: w = q d + m with m = fp16(-z s). Exact where -z s is an fp16 value; elsewhere off by
        # the rounding of m, which is at most half an fp16 ulp of z s.
        from triton_kernels import dequant_matmul as dq
        K = mod.in_features
        gs = K if mod.group_size == -1 else mod.group_size
        z = mod.zeros.double().repeat_interleave(gs, dim=1)[:, :K]
        s = mod.scales.double().repeat_interleave(gs, dim=1)[:, :K]
        m = -(z * s)
        m16 = m.to(torch.float16).double()
        q = dq.unpack(mod.packed, mod.bits, K).double()
        if rows is not None:
            m, m16, q, s = m[rows], m16[rows], q[rows], s[rows]
        assert torch.equal(got.double(), q * s + m16)  # exactly GGUF's definition with the fp16 m
        exact = m16 == m
        assert torch.equal(got[exact], want[exact])
        half_ulp = torch.where(m16 != 0, 2.0 ** (torch.floor(torch.log2(m16.abs())) - 11), 0.0)
        assert ((got.double() - want.double()).abs() <= half_ulp).all()
        inexact_groups += int((~exact).reshape(exact.shape[0], -1, 32).any(-1).sum())
    # The export's own comparison says the same.
    assert report["inexact_groups"] == inexact_groups
    assert report["exact"] is (inexact_groups == 0)
    if spec["method"] == "mixed":
        # A mixed allocation (both widths occur), each layer in its own blocks.
        assert {m.bits for m, _ in layers.values()} == {2, 4}
    if qtype == "Q4_1" and spec.get("bits") == 4:
        # 4-bit zeros (up to 15) times fp16 scales: most groups' m are not fp16 values.
        assert inexact_groups > 0 and 0 < report["max_abs_diff"] < 1e-3
    if qtype == "Q4_1" and spec.get("bits") == 2:
        # 2-bit zeros are 0..3; here every z s happened to be an fp16 value: an exact file.
        assert report["exact"]
    # Untouched tensors without a source GGUF (untouched="auto"): the embedding in F16, norms F32 copies.
    assert tensors["token_embd.weight"][0] == report["tensors"]["token_embd.weight"] == "F16"
    assert torch.equal(tensors["token_embd.weight"][1], model.model.embed_tokens.weight.half().float())
    assert tensors["output_norm.weight"][0] == "F32"
    assert torch.equal(tensors["output_norm.weight"][1], model.model.norm.weight)
    assert "output.weight" not in tensors  # tied lm_head: transformers ties it back


@pytest.mark.parametrize("spec, qtype", CASES[:3], ids=IDS[:3])
def test_transformers_gguf_loader_gives_the_same_logits(tmp_path, spec, qtype):
    from transformers import AutoModelForCausalLM
    model = _quantized(spec)
    export_gguf(model, tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings
    # Reference: the toolkit model for Q4_0/Q8_0 (the file holds its weights exactly); for Q4_1, the
    # toolkit model with the file's weights (fp16 m) put in a dense copy. Either way with the file's F16
    # embedding (the untouched default without a source GGUF).
    tensors = _read(tmp_path / "m.gguf")
    ref = copy.deepcopy(model)
    if qtype == "Q4_1":
        ref = copy.deepcopy(tiny_llama())
        for name, (mod, rows) in _toolkit_layers(model).items():
            i, g = int(name.split(".")[1]), name.split(".")[2]
            hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}[g]
            w = tensors[name][1]
            if rows is not None:
                w = w[torch.argsort(rows)]
            with torch.no_grad():
                ref.model.layers[i].get_submodule(hf).weight.copy_(w)
    assert tensors["token_embd.weight"][0] == "F16"
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(tensors["token_embd.weight"][1])
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, ref(input_ids=ids).logits
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"max abs err {err:.3g}"
    # The comparison could fail: the quantization changed the logits far more than that.
    with torch.no_grad():
        assert (tiny_llama()(input_ids=ids).logits - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("bits, group, sym, K, match", [
    (4, 16, True, 96, r"group_size=16 with K=96 does not fit GGUF's 32-weight blocks: use group_size 32"),
    (4, -1, True, 100, r"per-channel .* K=100: .* K must be a multiple of 32"),
    (8, 32, False, 96, r"asymmetric 8-bit grid fits no GGUF block type .* symmetric=True \(-> Q8_0\) or bits <= 4 \(-> Q4_1\)"),
])
def test_formats_that_do_not_fit_are_refused(bits, group, sym, K, match):
    with pytest.raises(ValueError, match=match):
        gguf_type_for(bits, group, sym, K)


def test_refusals_name_the_layer(tmp_path):
    model = tiny_llama()
    compress_model(model, {"method": "rtn", "bits": 4, "group_size": 16}, None, progress=False)
    with pytest.raises(ValueError, match=r"group_size=16 with K=96"):
        export_gguf(model, tmp_path / "a.gguf")
    model = tiny_llama()
    compress_model(model, {"method": "magnitude", "pattern": "2:4"}, None, progress=False)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj is a SparseLinear: GGUF stores dense"):
        export_gguf(model, tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_tokenizer_metadata_is_copied(tmp_path):
    src = gguf.GGUFWriter(str(tmp_path / "src.gguf"), "llama")
    src.add_tokenizer_model("gpt2")
    src.add_token_list([f"t{i}" for i in range(128)])
    src.add_bos_token_id(1)
    src.add_tensor("x", np.zeros(4, dtype=np.float32))
    src.write_header_to_file()
    src.write_kv_data_to_file()
    src.write_tensors_to_file()
    src.close()
    model = _quantized(CASES[0][0])
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer_from=tmp_path / "src.gguf")
    assert report["tokenizer_fields"] == 3
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1


def test_a_full_disk_leaves_no_file_and_a_rerun_succeeds(tmp_path, monkeypatch):
    """The disk fills while the tensors are written (simulated: the header and metadata are in the file,
    then some tensor bytes, then OSError(ENOSPC), which names no file): no file at the path, no
    temporary file beside it, the error names the path; an earlier export there is left as it was; the
    rerun writes a file that reads back."""
    import errno
    import os
    model = _quantized(CASES[0][0])
    out = tmp_path / "m.gguf"
    real = gguf.GGUFWriter.write_tensors_to_file

    def full_disk(self, *args, **kwargs):
        for f in self.fout:
            f.write(b"\0" * 4096)
            f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError) as e:
        export_gguf(model, out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    export_gguf(model, out)
    first = out.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError):
        export_gguf(_quantized(CASES[2][0]), out)
    assert out.read_bytes() == first and list(tmp_path.iterdir()) == [out]
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    assert {t for t, _ in _read(out).values()} >= {"Q4_0"}


# --- untouched tensors (embedding, norms, dense linears): F16 / F32 / the source GGUF's own bytes ---------

def _source_gguf(tmp_path, q8_names=("token_embd.weight", "blk.0.attn_q.weight")):
    """A GGUF file of the dense tiny Llama (written with untouched="f32") whose ``q8_names`` are re-encoded
    as Q8_0, like the default model's file (Q8_0 embedding, F32 norms): the source of a GGUF-loaded model."""
    dense = tmp_path / "dense.gguf"
    export_gguf(tiny_llama(), dense, untouched="f32")
    reader = gguf.GGUFReader(str(dense))
    w = gguf.GGUFWriter(str(tmp_path / "src.gguf"), "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        else:
            w.add_key_value(name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name in q8_names:
            w.add_tensor(t.name, gguf.quants.quantize(np.array(t.data), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "src.gguf"


def _raw(path):
    """GGUF name -> (type name, the tensor's bytes)."""
    return {t.name: (t.tensor_type.name, np.ascontiguousarray(t.data).view(np.uint8).tobytes())
            for t in gguf.GGUFReader(str(path)).tensors}


def _loaded(src):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()


def test_untouched_tensors_pass_the_source_bytes_through(tmp_path):
    src = _source_gguf(tmp_path)
    source = _raw(src)
    assert source["token_embd.weight"][0] == "Q8_0" and source["output_norm.weight"][0] == "F32"
    # A dense export of the GGUF-loaded model is its source, tensor for tensor (the Q8_0 q_proj of block 0
    # too: transformers un-permutes its rows on load, the export permutes them back).
    report = export_gguf(_loaded(src), tmp_path / "dense.gguf", source=src)
    assert _raw(tmp_path / "dense.gguf") == source
    assert report["passed_through"] == len(source) and report["untouched"] == "auto"

    # A quantized one: the block linears are the toolkit's Q4_0, everything else the source's bytes.
    model = _loaded(src)
    compress_model(model, CASES[0][0], None, progress=False)
    for mode in ("auto", "source"):
        report = export_gguf(model, tmp_path / f"{mode}.gguf", source=src, untouched=mode)
        got = _raw(tmp_path / f"{mode}.gguf")
        assert got.keys() == source.keys()
        for name, (qtype, data) in got.items():
            if name.startswith("blk.") and not name.endswith("norm.weight"):
                assert qtype == report["tensors"][name] == "Q4_0"
            else:
                assert (qtype, data) == source[name], name
        assert report["passed_through"] == 1 + 2 * 2 + 1   # token_embd, 2 norms per block, output_norm
    assert (tmp_path / "auto.gguf").read_bytes() == (tmp_path / "source.gguf").read_bytes()

    # f32 still writes the model's values (here the dequantized Q8_0 embedding) as F32.
    export_gguf(model, tmp_path / "f32.gguf", source=src, untouched="f32")
    tensors = _read(tmp_path / "f32.gguf")
    assert tensors["token_embd.weight"][0] == "F32"
    assert torch.equal(tensors["token_embd.weight"][1], model.model.embed_tokens.weight)
    assert (tmp_path / "f32.gguf").stat().st_size > (tmp_path / "auto.gguf").stat().st_size


def test_a_changed_tensor_is_not_passed_through(tmp_path):
    src = _source_gguf(tmp_path)
    model = _loaded(src)
    compress_model(model, CASES[0][0], None, progress=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] += 1e-3
    report = export_gguf(model, tmp_path / "auto.gguf", source=src)
    tensors = _read(tmp_path / "auto.gguf")
    assert tensors["token_embd.weight"][0] == report["tensors"]["token_embd.weight"] == "F16"
    assert torch.equal(tensors["token_embd.weight"][1], model.model.embed_tokens.weight.half().float())
    assert report["tensors"]["output_norm.weight"] == "F32" and report["passed_through"] == 5
    with pytest.raises(ValueError, match=r"untouched='source': cannot pass token_embd\.weight through from the "
                                         r"source GGUF: the model's values differ from the source's Q8_0 tensor"):
        export_gguf(model, tmp_path / "source.gguf", source=src, untouched="source")
    assert not (tmp_path / "source.gguf").exists()


def test_untouched_f16_and_f32_without_a_source(tmp_path):
    model = _quantized(CASES[0][0])
    sizes = {}
    for mode in ("f16", "f32"):
        report = export_gguf(model, tmp_path / f"{mode}.gguf", untouched=mode)
        tensors = _read(tmp_path / f"{mode}.gguf")
        emb = model.model.embed_tokens.weight
        assert tensors["token_embd.weight"][0] == mode.upper()
        assert torch.equal(tensors["token_embd.weight"][1], emb.half().float() if mode == "f16" else emb)
        for name in ("output_norm.weight", "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight"):
            assert tensors[name][0] == "F32"   # 1-D: F32 whatever the mode
        assert report["passed_through"] == 0
        sizes[mode] = (tmp_path / f"{mode}.gguf").stat().st_size
    assert sizes["f32"] - sizes["f16"] >= 128 * 96 * 2   # the embedding's half
    export_gguf(model, tmp_path / "auto.gguf")   # the default without a source GGUF is f16
    assert (tmp_path / "auto.gguf").read_bytes() == (tmp_path / "f16.gguf").read_bytes()


def test_untouched_bad_input(tmp_path):
    model = _quantized(CASES[0][0])
    with pytest.raises(ValueError, match=r"untouched='bf16': give one of auto, source, f16, f32"):
        export_gguf(model, tmp_path / "a.gguf", untouched="bf16")
    with pytest.raises(ValueError, match=r"untouched='source' needs source=, the GGUF file the model was loaded"):
        export_gguf(model, tmp_path / "a.gguf", untouched="source")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"token_embd\.weight: values up to 100000 do not fit F16 .* untouched='f32'"):
        export_gguf(model, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []
    export_gguf(model, tmp_path / "a.gguf", untouched="f32")
    assert _read(tmp_path / "a.gguf")["token_embd.weight"][1][0, 0] == 1e5


def test_cli_choices_match_the_exporter():
    from experiments.io import export_gguf as eg, saved_model_cli
    assert saved_model_cli.UNTOUCHED_TYPES == eg.UNTOUCHED_TYPES
