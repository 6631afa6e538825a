#!/usr/bin/env python3
"""Detect objects with an exported visionmoe ONNX model, using only onnxruntime, numpy and OpenCV.

    python export/detect.py model.onnx image.jpg --out results/ [--conf 0.25] [--iou 0.7] [--max-det 300]

Writes results/<image>.jpg (boxes drawn) and results/<image>.json (the detections) and prints the JSON path.
Class names, input size and batch come from the model's metadata. Every step follows Ultralytics' predict, so the
detections match `VisionMoE("model.onnx").predict(image)`: letterbox to the exported size, RGB in [0, 1], best
class per anchor above `conf`, class-aware NMS, boxes mapped back to the original image.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

PAD_VALUE = 114  # letterbox border grey, as in training


def read_metadata(session: ort.InferenceSession) -> dict:
    """Export metadata with its Python-literal fields (names, imgsz, ...) parsed."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    for key in ("names", "imgsz", "batch", "stride"):
        meta[key] = ast.literal_eval(meta[key])
    return meta


def letterbox(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to `shape` (h, w); returns (image, (gain_x, gain_y), (pad_x, pad_y))."""
    h0, w0 = image.shape[:2]
    r = min(shape[0] / h0, shape[1] / w0)
    w, h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    if (w, h) != (w0, h0):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (shape[1] - w) / 2, (shape[0] - h) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, (w / w0, h / h0), (left, top)


def detect(
    session: ort.InferenceSession, image: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300
) -> list[dict]:
    """Detections in a BGR image: [{class_id, class_name, confidence, box: [x1, y1, x2, y2] in pixels}]."""
    meta = read_metadata(session)
    inp = session.get_inputs()[0]
    padded, (gx, gy), (px, py) = letterbox(image, tuple(meta["imgsz"]))
    x = padded[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255  # BGR HWC -> RGB CHW in [0, 1]
    x = np.repeat(x, meta["batch"], 0)  # the graph's batch is static; extra copies are ignored
    pred = session.run(None, {inp.name: np.ascontiguousarray(x)})[0][0].T  # [anchors, 4 + nc], boxes as xywh

    scores_all = pred[:, 4:]
    classes = scores_all.argmax(1)
    scores = scores_all[np.arange(len(pred)), classes]
    keep = scores > conf
    xywh, scores, classes = pred[keep, :4], scores[keep], classes[keep]
    tl = xywh[:, :2] - xywh[:, 2:] / 2  # NMSBoxesBatched takes top-left x, y, w, h
    idx = cv2.dnn.NMSBoxesBatched(
        np.concatenate((tl, xywh[:, 2:]), 1).tolist(), scores.tolist(), classes.tolist(), conf, iou
    )
    idx = np.asarray(idx, dtype=int).reshape(-1)
    idx = idx[np.argsort(-scores[idx], kind="stable")][:max_det]

    boxes = np.concatenate((tl[idx], tl[idx] + xywh[idx, 2:]), 1)  # xyxy in the letterboxed image
    boxes = (boxes - [px, py, px, py]) / [gx, gy, gx, gy]
    h0, w0 = image.shape[:2]
    boxes = boxes.clip(0, [w0, h0, w0, h0])
    return [
        {
            "class_id": int(c),
            "class_name": str(meta["names"][int(c)]),
            "confidence": float(s),
            "box": [round(float(v), 2) for v in b],
        }
        for b, s, c in zip(boxes, scores[idx], classes[idx])
    ]


def draw(image: np.ndarray, detections: list[dict]) -> np.ndarray:
    """Copy of `image` with each detection's box and label drawn."""
    image = image.copy()
    for d in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        color = tuple(int(c) for c in np.random.default_rng(d["class_id"]).integers(0, 255, 3))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, 2)
        label = f"{d['class_name']} {d['confidence']:.2f}"
        cv2.putText(image, label, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    return image


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="exported .onnx model")
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("--out", type=Path, default=Path("detections"), help="output folder")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections")
    args = parser.parse_args(argv)

    image = cv2.imread(str(args.image))
    if image is None:
        parser.error(f"cannot read image '{args.image}'")
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    detections = detect(session, image, args.conf, args.iou, args.max_det)
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out / f"{args.image.stem}.jpg"), draw(image, detections))
    out = args.out / f"{args.image.stem}.json"
    out.write_text(json.dumps({"model": str(args.model), "image": str(args.image), "detections": detections}, indent=1))
    print(out)
    return out


if __name__ == "__main__":
    main()
