"""Controlled experiments behind docs/training.md "Pixel size: matching and scale robustness".

    python benchmarks/scale_causes.py variants MODEL 0.7,0.8,0.9,1.2,1.4 emseg,prob_noaa,page_noaa,page_bicubic,norm_after,oracle_norm
    python benchmarks/scale_causes.py width MODEL

`variants`: ISBI slices 24-29 resampled as bench_scale.py does, predicted with matching on, with the
predictor's rescaling or normalisation patched: no antialiasing when the probabilities are shrunk back
(prob_noaa) or when the page is shrunk (page_noaa); bicubic enlargement of the page (page_bicubic, and
bicubic_all for the probabilities too); normalisation after the rescale (norm_after); the native page's
percentiles (oracle_norm). Prints the membrane IoU and pixel error of each.
`width`: the membrane threshold and probability smoothing at native scale, and the predicted membrane
fraction with matching on and off at 0.8-1.2 (whether "off" wins by drawing membranes wider in nm).
One torch thread; ../shared/data (or EMSEG_BENCH_DATA) must hold isbi2012.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch

torch.set_num_threads(1)
if len(sys.argv) < 3 or sys.argv[1] not in ("variants", "width"):
    raise SystemExit(__doc__)
MODE = sys.argv.pop(1)
if MODE == "variants":
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from bench_scale import iou_error, load, resample_image, resample_mask, resampled_shape

    import emseg.infer.predictor as P
    import emseg.infer.preprocess as pre
    from emseg.model.modelfile import load_model

    model = load_model(sys.argv[1])
    factors = [float(f) for f in sys.argv[2].split(",")]
    variants = sys.argv[3].split(",")
    img, msk, vimg, vmsk, classes, px = load("isbi")
    orig_resize, orig_norm = pre.resize, pre.normalize_tensor

    def make_resize(page_up="bilinear", page_aa=True, prob_aa=True, prob_mode="bilinear"):
        def resize(array, shape):
            t = torch.as_tensor(array)
            page = t.ndim == 2
            t = t[None, None] if page else t[None]
            shrinking = shape[0] < t.shape[-2]
            mode = (page_up if page else prob_mode) if not shrinking else "bilinear"
            aa = shrinking and (page_aa if page else prob_aa)
            kw = {} if mode == "nearest" else {"align_corners": False}
            out = F.interpolate(t.float(), size=shape, mode=mode, antialias=aa, **kw)[0]
            return out[0] if page else out
        return resize

    LOHI = {}
    def oracle_norm(page, norm, *, out=None):
        lo, hi = LOHI["v"]
        x = ((page.float() - lo) / (hi - lo)).clamp(0, 1)
        x = (x - norm.mean) / norm.std
        if out is not None:
            out.copy_(x); return out
        return x

    def norm_after_infer(self, page, pixel_size_nm, keep, progress):
        # resize the raw page to the model's pixel size first, then normalise with its own statistics
        factor = pre.rescale_factor(pixel_size_nm, self.card.pixel_size_nm)
        if factor == 1.0:
            return ORIG_INFER(self, page, pixel_size_nm, keep, progress)
        shape = tuple(page.shape)
        big = P.resize(page.float(), pre.scaled_shape(shape, factor))
        labels, probs = ORIG_INFER(self, big, None, True, progress)
        probs = P.resize(probs, shape)
        return P.argmax_classes(probs), (probs if keep else None)
    ORIG_INFER = P.Predictor._infer

    VARIANTS = {
        "emseg": {},
        "prob_noaa": {"resize": make_resize(prob_aa=False)},
        "page_noaa": {"resize": make_resize(page_aa=False)},
        "page_bicubic": {"resize": make_resize(page_up="bicubic")},
        "bicubic_all": {"resize": make_resize(page_up="bicubic", prob_mode="bicubic")},
        "norm_after": {"infer": norm_after_infer},
        "oracle_norm": {"oracle": True},
    }
    predictor = model.predictor(device="auto")
    native_lohi = [tuple(np.percentile(p, (1, 99))) for p in vimg]
    out = {}
    for f in factors:
        shape = resampled_shape(vimg.shape[1:], f)
        imgs = vimg if f == 1.0 else np.stack([resample_image(p, shape) for p in vimg])
        tgt = vmsk > 0 if f == 1.0 else np.stack([resample_mask(m, shape) for m in vmsk]) > 0
        for name in variants:
            v = VARIANTS[name]
            P.resize = v.get("resize", orig_resize)
            P.Predictor._infer = v.get("infer", ORIG_INFER)
            preds = []
            for i, p in enumerate(imgs):
                P.normalize_tensor = oracle_norm if v.get("oracle") else orig_norm
                LOHI["v"] = native_lohi[i]
                preds.append(predictor.predict_page(p, pixel_size_nm=4.0 / f).argmax(0) == 1)
            P.resize, P.normalize_tensor, P.Predictor._infer = orig_resize, orig_norm, ORIG_INFER
            iou, err = iou_error(np.stack(preds), tgt)
            out[f"{f:.1f} {name}"] = (round(iou, 4), round(err, 4))
            print(f"{f:.1f} {name:14s} IoU {iou:.4f} err {err:.4f}", flush=True)
    print(json.dumps(out))
else:
    from bench_scale import iou_error, load, resample_image, resample_mask, resampled_shape
    from scipy import ndimage as ndi

    from emseg.model.modelfile import load_model
    model = load_model(sys.argv[1])
    pr = model.predictor(device="auto")
    img, msk, vimg, vmsk, classes, px = load("isbi")
    t = vmsk > 0
    probs = np.stack([pr.predict_page(p)[1] for p in vimg])
    print("native: label fraction %.4f" % t.mean())
    for thr in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        iou, err = iou_error(probs >= thr, t)
        print(f"  threshold {thr}: predicted fraction {(probs >= thr).mean():.4f} IoU {iou:.4f}")
    for s in (0.5, 0.7, 1.0):
        sm = np.stack([ndi.gaussian_filter(p, s) for p in probs])
        iou, err = iou_error(sm >= 0.5, t)
        print(f"  probabilities smoothed sigma {s}: fraction {(sm >= 0.5).mean():.4f} IoU {iou:.4f}")
    for f in (0.8, 0.9, 1.1, 1.2):
        shape = resampled_shape(vimg.shape[1:], f)
        imgs = np.stack([resample_image(p, shape) for p in vimg])
        tg = np.stack([resample_mask(m, shape) for m in vmsk]) > 0
        for key, given in (("on", 4 / f), ("off", None)):
            pp = np.stack([pr.predict_page(p, pixel_size_nm=given)[1] for p in imgs]) >= 0.5
            iou, err = iou_error(pp, tg)
            print(f"f={f} {key}: label fraction {tg.mean():.4f} predicted {pp.mean():.4f} IoU {iou:.4f}", flush=True)
