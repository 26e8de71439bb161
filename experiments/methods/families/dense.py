"""The uncompressed baseline, ``{"method": "dense"}``: reported as fp16 storage, the reference of
every compression ratio. It touches no layer."""
from __future__ import annotations

from typing import Any, Mapping

from experiments.methods.families.base import random_linear
from experiments.methods.spec import CompressionReport, Family, LayerRecord, fp16_bytes, register, register_format


class DenseFamily(Family):
    name = "dense"
    methods = {"dense": frozenset()}
    level = "model"

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {}

    def compress_model(self, model, spec, calib_ids, *, driver=None, progress=True):
        from experiments.lm.models import linear_layers, linear_weight
        report = CompressionReport(spec=spec)
        for name, layer in linear_layers(model):
            w = linear_weight(layer)
            n, k = w.shape
            fb = fp16_bytes(n, k)
            report.layers.append(LayerRecord(name, (n, k), "dense-fp16", fb, fb, 0.0,
                                             float(w.double().square().sum())))
        return report

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {"kind": "dense"}


FAMILY = register(DenseFamily())


def _build(N, K, *, dtype, device, backend, seed, tune_m):
    import torch
    return random_linear(N, K, dtype, device, torch.Generator().manual_seed(seed))


register_format("dense", _build)
