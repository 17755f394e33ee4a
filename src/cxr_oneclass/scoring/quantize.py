"""int8 scoring graph: onnxruntime static quantisation of the exported graph, calibrated on training normals.

What is quantised: the networks (U, E, D and the lesion detector S): their convolutions run as int8 (QDQ format,
per-channel weights, MinMax activation ranges on training normals; Percentile and Entropy did no better). The score stage after them (SSIM windows, the
whitened feature distances, pooling of S's map) stays fp32: it is cheap, and it is where a rounding error would be
magnified into the score. The graph is exported with sub-pixel upsampling first (`model.rewrite`), because
onnxruntime quantises `Conv` but runs `ConvTranspose` in float.

The export's metadata is the fp32 export's (calibration included: scores stay on the same scale, and
`jobs.export` checks how far the int8 scores move from PyTorch's), plus `cxr_oneclass.precision` = int8 and
`cxr_oneclass.int8` (JSON: how it was calibrated).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import RunError
from ..io_utils import atomic_path
from ..model.networks import OneClassGAN
from .calibration import Calibration
from .onnx import META, OPSET, export_onnx, write_metadata

log = logging.getLogger(__name__)

NETWORKS = ("U", "E", "D", "det")  # OneClassGAN's networks, as the exporter names their nodes (/U/..., /det/...)
# S's last level stays fp32: its upsampled features and the skip from the first level meet there in one tensor of
# very unequal ranges, and one int8 scale for both shifted S's mean lesion probability on normal films by 0.03 (its
# spread over normals is 0.025), which moved the score by 0.3 of the validation range. Kept fp32, 0.0005.
FP32_DETECTOR = ("det/up.0/", "det/dec.0/", "det/head/")
MEMBER = re.compile(r"/det/members\.\d+/")  # one S of several (model.detector.DetectorEnsemble)
CALIBRATION_IMAGES = 256  # training normals the activation ranges are taken from
CALIBRATION_BATCH = 32


def quantisable(graph) -> list[bool]:
    """Per node of an onnx graph: True for a network node to quantise, False for one to keep fp32 (the score stage,
    the detector's full-resolution output level, FP32_DETECTOR, in each S of config detectors, and the averaging of
    several S's: a logit of probabilities near 0 or 1 has no useful 8-bit scale)."""
    prefixes = tuple(f"/{n}/" for n in NETWORKS) + tuple(f"/net/{n}/" for n in NETWORKS)
    fp32_prefixes = tuple(f"/{p}" for p in FP32_DETECTOR) + tuple(f"/net/{p}" for p in FP32_DETECTOR)
    names = [MEMBER.sub("/det/", n.name, count=1) for n in graph.node]  # each S's nodes named as one S's are
    several = any(name != n.name for n, name in zip(graph.node, names))
    upsampled = {o for n, name in zip(graph.node, names) if name.startswith(fp32_prefixes) for o in n.output}
    return [name.startswith(prefixes) and not name.startswith(fp32_prefixes)
            and not (several and name == n.name and name.startswith(("/det/", "/net/det/")))  # the averaging itself
            and not (n.op_type == "Concat" and upsampled.intersection(n.input)) for n, name in zip(graph.node, names)]


def pick_calibration(images: np.ndarray, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to `n` images (N, S, S) spread evenly over the set: deterministic, and not only its first files."""
    if len(images) <= n:
        return images
    return images[np.linspace(0, len(images) - 1, n).round().astype(int)]


def quantize_model(model: OneClassGAN, out: str | Path, calibration_images: np.ndarray, calibration: Calibration | None = None,
                   source: str = "", opset: int = OPSET, extra_meta: dict[str, str] | None = None) -> dict:
    """Write the int8 scoring graph of `model` to `out` (atomically), its activation ranges calibrated on
    `calibration_images` (uint8 (N, S, S) normal films of the model's size). Returns what it did."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    size = model.cfg.image_size
    images = np.asarray(calibration_images)
    if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8 or len(images) == 0:
        raise RunError(f"int8 calibration needs uint8 images (N, {size}, {size}) of normal films; got {images.dtype} {images.shape}")
    images = pick_calibration(images)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            s = next(self._it, None)
            return None if s is None else {"image": np.ascontiguousarray(images[s : s + CALIBRATION_BATCH, None])}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="cxr-int8-") as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        export_onnx(model, fp32, calibration, opset, subpixel=True, extra_meta=extra_meta)
        meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        nodes = [n.name for n in graph.node]
        keep_fp32 = [name for name, q in zip(nodes, quantisable(graph)) if not q]
        if len(keep_fp32) == len(nodes):
            raise RunError("int8 export: no network nodes found in the graph (did the exporter rename them?)")
        with atomic_path(out) as target:
            # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only) onnxruntime's uint8 x int8 kernels
            # saturate their int16 pair sums; full-range graphs disagreed with PyTorch by 0.7 of the score's scale there.
            quantize_static(str(pre), str(target), Batches(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, nodes_to_exclude=keep_fp32)
            proto = onnx.load(str(target))
            info = {"calibration_images": int(len(images)), "calibration_source": source, "format": "QDQ",
                    "activations": "uint8", "weights": "int8 per channel, 7-bit range", "fp32_nodes": len(keep_fp32),
                    "quantised_nodes": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)}
            meta.update({META + "precision": "int8", META + "int8": json.dumps(info)})
            write_metadata(proto, meta)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(target))
    log.info("int8 graph %s: %d calibration images, %d quantise nodes", out, info["calibration_images"], info["quantised_nodes"])
    return info
