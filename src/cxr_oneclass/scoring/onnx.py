"""ONNX export of the whole scoring graph, and scoring with onnxruntime.

The graph (`ScoringGraph`):
    input   image     uint8 (B, 1, H, W): grey images already decoded and resized to the run's size, exactly what
                      `data.images.load_image` returns (stack them and add the channel axis); B is dynamic
    outputs score     float32 (B,): the raw anomaly score A(x) (eq. of scoring.py, eval-mode batch norm)
            rec, ssim, fdist, adv, enc  float32 (B,): the components the model has (adv with D, enc with E)
            heatmap   float32 (B, H, W): where the score sees the abnormality. |x - x'| in the model's [-1, 1] units
                      (its mean is `rec`), or for scores with sdist each grid cell's share of sdist, enlarged
                      bilinearly (its mean is about `sdist`); metadata `cxr_oneclass.heatmap` says which

Metadata (`metadata_props`) carries what scoring needs without the run folder: `cxr_oneclass.image_size`,
`cxr_oneclass.calibration` (JSON: lo, hi, threshold on the normalised scale; "null" if the run had none),
`cxr_oneclass.config`, `cxr_oneclass.components`, `cxr_oneclass.heatmap` (residual | sdist), `cxr_oneclass.version`,
`cxr_oneclass.precision` (fp32, or int8 for `scoring.quantize`'s graph, which also records `cxr_oneclass.int8`),
`cxr_oneclass.weights_sha256` (the run's weights, when exported from a run folder). normalised = (score - lo) / (hi - lo);
an image is flagged when normalised >= threshold.

Exported with the TorchScript-based exporter (`dynamo=False`: the torch.export-based one needs onnxscript), batch
norm folded into the convolutions, opset 17.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..errors import RunError
from ..io_utils import atomic_path
from ..model.networks import OneClassGAN, fold_batchnorm
from ..model.rewrite import subpixel_upsampling
from .calibration import Calibration
from .inference import component_weights, compute_components, model_components
from .terms import RESIDUAL, heatmap_kind

FORMAT = "cxr-oneclass-onnx/1"
OPSET = 17
META = "cxr_oneclass."


class ScoringGraph(nn.Module):
    """uint8 images (B,1,H,W) -> (score, components..., heatmap), computed by `scoring.compute_components`."""

    def __init__(self, model: OneClassGAN, subpixel: bool = False) -> None:
        super().__init__()
        self.net = fold_batchnorm(model).float().cpu()
        if subpixel:  # conv + depth-to-space instead of transposed convs: what int8 quantisation needs
            subpixel_upsampling(self.net)
        self.weights = component_weights(model)
        self.components = model_components(model)

    @property
    def output_names(self) -> list[str]:
        return ["score", *self.components, "heatmap"]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = compute_components(self.net, image.float() / 127.5 - 1.0)
        return (out["score"], *[out[k] for k in self.components], out["heatmap"])


def export_onnx(model: OneClassGAN, out: str | Path, calibration: Calibration | None = None, opset: int = OPSET, check: bool = True,
                subpixel: bool = False, extra_meta: dict[str, str] | None = None) -> Path:
    """Write the scoring graph of `model` to `out` (atomically: temp file + rename) with the metadata above;
    `onnx.checker` validates it before it replaces `out`. `subpixel`: upsample with conv + depth-to-space
    (`model.rewrite`), the form `scoring.quantize` quantises; the same function, a little slower in fp32."""
    import onnx

    out = Path(out)
    graph = ScoringGraph(model, subpixel).eval()
    size = model.cfg.image_size
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    names = graph.output_names
    dynamic = {"image": {0: "batch"}, **{k: {0: "batch"} for k in names}}
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                graph, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["image"],
                output_names=names, dynamic_axes=dynamic, do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        meta = {
            "format": FORMAT,
            "version": __version__,
            "image_size": str(size),
            "input": "uint8 (B,1,H,W) grey, as data.images.load_image returns",
            "components": ",".join(graph.components),
            "score_weights": json.dumps(graph.weights),
            "calibration": json.dumps(calibration.to_dict() if calibration else None),
            "config": json.dumps(model.cfg.to_dict()),
            "heatmap": heatmap_kind(model.cfg),
            "precision": "fp32",
            **(extra_meta or {}),
        }
        write_metadata(proto, {META + k: v for k, v in meta.items()})
        proto.producer_name = "cxr-oneclass"
        proto.producer_version = __version__
        proto.doc_string = "cxr-oneclass scoring graph; see cxr_oneclass/scoring/onnx.py for inputs, outputs and metadata"
        if check:
            onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return out


def write_metadata(proto, meta: dict[str, str]) -> None:
    """Replace an onnx ModelProto's metadata_props by `meta` (full keys)."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def set_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Set `cxr_oneclass.<key>` metadata entries of an .onnx file in place (for a file not yet put in place)."""
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update({META + k: v for k, v in values.items()})
    write_metadata(proto, meta)
    onnx.save(proto, str(path))


class OnnxScorer:
    """Scores uint8 images (N, H, W) with an exported graph, using only the .onnx file."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise RunError(f"{self.path}: ONNX file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=ort.get_available_providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RunError(f"{self.path}: not a usable ONNX model ({str(exc).splitlines()[0]})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(META + "format") != FORMAT:
            raise RunError(f"{self.path}: not a cxr-oneclass export (no {META}format metadata)")
        self.image_size = int(meta[META + "image_size"])
        cal = json.loads(meta.get(META + "calibration", "null"))
        self.calibration = Calibration.from_dict(cal) if cal else None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.score_terms = list(json.loads(meta.get(META + "score_weights", "{}")))  # the terms the score sums
        self.heatmap_kind = meta.get(META + "heatmap", RESIDUAL)  # exports before sdist: always the residual
        self.precision = meta.get(META + "precision", "fp32")  # int8: scoring.quantize's graph

    def score(self, images: np.ndarray, batch_size: int = 64, keep_maps: bool = False) -> dict[str, np.ndarray]:
        """Like `scoring.inference.score_images`: score and components (N,) as float64, heat maps (N,H,W) as float16."""
        chunks: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[s : s + batch_size], dtype=np.uint8)[:, None]
            for name, value in zip(self.outputs, self.session.run(self.outputs, {"image": batch})):
                if name == "heatmap":
                    if keep_maps:
                        chunks.setdefault(name, []).append(value.astype(np.float16))
                else:
                    chunks.setdefault(name, []).append(value.astype(np.float64))
        return {k: np.concatenate(v) for k, v in chunks.items()}
