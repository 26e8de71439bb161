"""The compression-family registry: a family is added by one module, the driver never names one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import experiments.methods.spec as registry
from experiments.methods import families
from experiments.methods.compress import MethodSpec, compress_model, parse_spec
from experiments.methods.families import base
from experiments.run.point import method_columns


class _Identity(nn.Module):
    """A toy 'compressed' layer: a dense copy that reports half its fp16 size."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w.clone())

    def forward(self, x):
        return x @ self.w.T.to(x.dtype)

    def memory_bytes(self) -> int:
        return self.w.numel()


class _ToyFamily(families.Family):
    name = "toy"
    methods = {"toy_scale": frozenset({"factor"})}
    columns = ("factor",)

    def parse(self, method, spec, where):
        f = spec.get("factor", 1.0)
        if not base.is_number(f) or f <= 0:
            families.fail(where, f"factor={f!r} must be a positive number")
        return {"factor": float(f)}

    def label(self, spec):
        return f"toy-x{spec.factor:g}"

    def compress_layer(self, spec, w, bias, stats):
        mod = _Identity(w * spec.factor)
        return families.LayerResult(mod, w * spec.factor, mod.memory_bytes())

    def method_columns(self, spec):
        return {"factor": spec.factor}


@pytest.fixture
def toy_family():
    fam = families.register(_ToyFamily())
    try:
        yield fam
    finally:
        del registry.FAMILIES[fam.name]
        for m in fam.methods:
            del registry._BY_METHOD[m]


def test_the_builtin_families_own_every_method_once():
    owners = {m: families.family_of(m).name for m in families.methods()}
    assert owners == {"dense": "dense", "rtn": "quant", "gptq": "quant", "magnitude": "sparse", "wanda": "sparse",
                      "sparsegpt": "sparse", "svd": "lowrank", "whitened_svd": "lowrank", "combo": "combo",
                      "nf": "codebook", "fp4": "codebook", "piecewise": "codebook", "kmeans": "codebook",
                      "squeezellm": "codebook",
                      "channels": "structured", "heads": "structured", "channels_heads": "structured",
                      "layers": "structured", "hqq": "hqq", "awq": "awq", "quarot": "rotate", "mixed": "mixed"}


def test_unknown_method_and_option_errors_name_what_fits():
    with pytest.raises(ValueError, match=r"unknown method='nope'; choose one of dense, rtn, gptq"):
        parse_spec({"method": "nope"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sparsity'\] for method='rtn'"):
        parse_spec({"method": "rtn", "bits": 4, "sparsity": 0.5})
    spec = parse_spec({"method": "rtn", "bits": 4})
    assert spec.pattern is None  # an option of another family: unset here
    with pytest.raises(AttributeError, match="no option 'bitz'"):
        spec.bitz
    with pytest.raises(AttributeError, match="immutable"):
        spec.bits = 3


def test_a_clashing_family_is_refused(toy_family):
    class Clash(_ToyFamily):
        name = "toy2"
    with pytest.raises(ValueError, match=r"method\(s\) \['toy_scale'\] already belong to \['toy'\]"):
        families.register(Clash())
    with pytest.raises(ValueError, match="already registered"):
        families.register(_ToyFamily())


def test_a_new_family_works_end_to_end_without_touching_the_driver(toy_family):
    from tests.test_compress import tiny_llama
    spec = parse_spec({"method": "toy_scale", "factor": 2})
    assert spec == MethodSpec("toy_scale", factor=2.0) and spec.label() == "toy-x2" and spec.family == "toy"
    cols = method_columns(spec)
    assert cols["factor"] == 2.0 and cols["bits"] == "" and cols["method"] == "toy_scale"
    with pytest.raises(ValueError, match="factor=-1 must be a positive number"):
        parse_spec({"method": "toy_scale", "factor": -1})
    model = tiny_llama()
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    report = compress_model(model, spec, None, progress=False, keep_weights=True)
    assert isinstance(model.model.layers[0].mlp.down_proj, _Identity)
    assert torch.equal(model.model.layers[0].mlp.down_proj.w, w0 * 2)
    assert report.bytes * 2 == report.fp16_bytes  # the family's own byte count reached the report
    assert report.weight_rel_error == pytest.approx(1.0)  # ||2W - W|| / ||W||


def test_a_spec_survives_pickling():
    """Executors (Ray, multiprocessing) pickle specs; an immutable spec must rebuild through __init__."""
    import copy
    import pickle
    spec = parse_spec({"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"},
                                                    {"method": "gptq", "bits": 4, "group_size": 64}]})
    for back in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert back == spec and back.label() == spec.label() and back.to_dict() == spec.to_dict()
