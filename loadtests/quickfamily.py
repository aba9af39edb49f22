"""A quick SmolLM2 family for load tests when no PLRD-built family is at hand (a shared CPU, no time).

Whitened truncated SVD of the parent from a small calibration set, every member cut *from the parent*
with one shared set of SVDs (not progressively, not healed): the members have the sizes and the
serving costs of real family members, and poor accuracy. Use `family build` for a real family.

    python -m loadtests.quickfamily --parent runs/parent-smollm2-135m --out runs/family-loadtest \
        --targets 0.9,0.8,0.7 --calib-sequences 8 --calib-seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from family import defaults


def _plain_spectra_f32(model):
    """plrd's plain spectra, with the SVD done in float32 (several times faster on a CPU than float64)."""
    import torch
    from tqdm import tqdm

    from family.lowrank import projection_paths
    from plrd.factorize import Spectrum, dense_weight

    out = []
    for path in tqdm(projection_paths(model.config.num_hidden_layers), desc="svd (float32)", unit="matrix"):
        module = model.get_submodule(path)
        W = dense_weight(module).float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        bias = getattr(module, "bias", None)
        out.append(Spectrum(path, W.shape[0], W.shape[1], U.double(), S.double(), Vh.double(), None if bias is None else bias.detach().clone()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", type=Path, default=defaults.DEFAULT_PARENT_DIR)
    ap.add_argument("--out", type=Path, default=Path("runs/family-loadtest"))
    ap.add_argument("--name", default=defaults.FAMILY_NAME)
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--method", choices=("whitened", "plain"), default="plain",
                    help="plain: float32 SVD of W (minutes on a busy CPU); whitened: plrd's activation-aware SVD (better, slower)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family.registry import member_name, parent_name, sync_family
    from plrd.calibrate import collect_grams
    from family.text import pack, read_source, tokenize
    from plrd.factorize import count_parameters, factorize, spectra

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parent_dir = out / parent_name(args.name)
    if not (parent_dir / "config.json").is_file():
        parent_dir.mkdir(parents=True, exist_ok=True)
        for f in args.parent.iterdir():
            if f.is_file():
                try:
                    os.link(f, parent_dir / f.name)
                except OSError:
                    import shutil

                    shutil.copy2(f, parent_dir / f.name)
        (parent_dir / "provenance.json").write_text(json.dumps({"method": "parent", "source": str(args.parent)}))
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(parent_dir)
    params = count_parameters(parent)
    t0 = time.perf_counter()
    grams = None
    if args.method == "whitened":
        ids = tokenize(tok, read_source(str(defaults.WIKITEXT_VALID)).text)
        grams = collect_grams(parent, pack(ids, args.calib_seq_len, args.calib_sequences, seed=0))
    specs = spectra(parent, grams) if grams is not None else _plain_spectra_f32(parent)
    del grams
    for t in (float(x) for x in args.targets.split(",")):
        d = out / member_name(args.name, t)
        if (d / "config.json").is_file():
            continue
        member = factorize(parent, t, params, grams=None, allocation="allocated", specs=specs, progress=False)
        member.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "provenance.json").write_text(json.dumps({
            "method": f"loadtests.quickfamily {args.method} SVD from the parent, no healing", "target": t,
            "derived_from": parent_name(args.name), "calib_sequences": args.calib_sequences, "calib_seq_len": args.calib_seq_len,
            "parameters": count_parameters(member)}))
        print(f"{d.name}: {count_parameters(member) / params:.3f} of the parent", flush=True)
    sync_family(out, parent_dir=parent_dir, family_name=args.name)
    print(f"family in {out} after {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
