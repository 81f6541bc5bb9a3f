"""ImageNet-C corruption errors (mCE, relative mCE; google-research/augmix `imagenet.py` `compute_mce`) and
the ImageNet-R class mask (hendrycks/imagenet-r `eval.py` `imagenet_r_mask`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Hendrycks & Dietterich (ICLR 2019) benchmark corruptions, in the paper's order
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# held out in the paper; reported apart, never part of mCE (no AlexNet baseline is published for them)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# AlexNet top-1 error averaged over the 5 severities, per corruption. Source: google-research/augmix
# `imagenet.py` ALEXNET_ERR ("Raw AlexNet errors taken from https://github.com/hendrycks/robustness");
# hendrycks/robustness itself only links a spreadsheet (README.md, "mean Corruption Error"; @8190fe3).
ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet clean ImageNet top-1 error, 43.48 %: the value Hendrycks & Dietterich (2019) normalise relative
# mCE with (their Table 1 lists AlexNet's clean error as 43.5 %).
ALEXNET_CLEAN_ERR = 0.4348


def imagenet_c_report(errors: Mapping[tuple[str, int], float], clean_err: float | None = None) -> dict[str, float]:
    """Metrics (percent) from top-1 errors E_{s,c} given as fractions in [0, 1].

    - `<c>.s<s>.err` for every (corruption, severity) measured, and `<c>.err` (mean over severities);
    - `<c>.ce` = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c} for each benchmark corruption with all 5 severities;
    - `mce` = mean CE over the 15 benchmark corruptions (only when all 15 are complete; otherwise
      `mce_partial` over the complete ones plus `mce_corruptions`, so a partial number never poses as mCE);
    - with `clean_err`: `<c>.relative_ce` = Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − E^AlexNet_clean)
      and `relative_mce` (Hendrycks & Dietterich 2019, §3; the clean error is subtracted at every severity,
      which makes AlexNet's relative mCE exactly 100 %);
    - `extra.<c>.s<s>.err` / `extra.<c>.err` for the 4 held-out corruptions.
    """
    known = set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    for (c, s), e in errors.items():
        if c not in known:
            raise ValueError(f"ImageNet-C: unknown corruption {c!r}; expected one of {sorted(known)}")
        if s not in SEVERITIES:
            raise ValueError(f"ImageNet-C: {c} severity {s!r} is not one of {SEVERITIES}")
        if not 0.0 <= e <= 1.0:
            raise ValueError(f"ImageNet-C: error of {c}/{s} = {e} is not a fraction in [0, 1]")
    if clean_err is not None and not 0.0 <= clean_err <= 1.0:
        raise ValueError(f"ImageNet-C: clean error {clean_err} is not a fraction in [0, 1]")

    out: dict[str, float] = {}
    ce: dict[str, float] = {}
    rel: dict[str, float] = {}
    for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS):
        measured = {s: errors[(c, s)] for s in SEVERITIES if (c, s) in errors}
        if not measured:
            continue
        prefix = f"extra.{c}" if c in EXTRA_CORRUPTIONS else c
        for s, e in measured.items():
            out[f"{prefix}.s{s}.err"] = 100.0 * e
        out[f"{prefix}.err"] = 100.0 * sum(measured.values()) / len(measured)
        if c in EXTRA_CORRUPTIONS or len(measured) < len(SEVERITIES):
            continue
        total = sum(measured.values())
        alex_total = len(SEVERITIES) * ALEXNET_ERR[c]  # the table holds the mean over severities
        ce[c] = total / alex_total
        out[f"{c}.ce"] = 100.0 * ce[c]
        if clean_err is not None:
            rel[c] = (total - len(SEVERITIES) * clean_err) / (alex_total - len(SEVERITIES) * ALEXNET_CLEAN_ERR)
            out[f"{c}.relative_ce"] = 100.0 * rel[c]
    if len(ce) == len(CORRUPTIONS):
        out["mce"] = 100.0 * sum(ce.values()) / len(ce)
        if rel:
            out["relative_mce"] = 100.0 * sum(rel.values()) / len(rel)
    elif ce:
        out["mce_partial"] = 100.0 * sum(ce.values()) / len(ce)
        out["mce_corruptions"] = float(len(ce))
        if rel:
            out["relative_mce_partial"] = 100.0 * sum(rel.values()) / len(rel)
    if clean_err is not None:
        out["clean_err"] = 100.0 * clean_err
    return out


def imagenet_r_mask(class_wnids: Sequence[str]) -> torch.Tensor:
    """The official ImageNet-R logit mask (hendrycks/imagenet-r `eval.py`): True where the head's class
    is one of the 200 IN-R wnids. With a head in sorted-wnid order (IN-1K), the kept columns are in the
    same order as ImageNet-R's sorted class folders, i.e. its labels 0..199."""
    from vfm.data.classes import imagenet_r_wnids

    wanted = set(imagenet_r_wnids())
    mask = torch.tensor([w in wanted for w in class_wnids], dtype=torch.bool)
    found = int(mask.sum())
    if found != len(wanted):
        missing = sorted(wanted - set(class_wnids))
        raise ValueError(f"ImageNet-R: the model's head has {found} of the 200 IN-R classes "
                         f"(missing e.g. {missing[:5]}); IN-R needs an IN-1K (or superset) classifier")
    return mask
