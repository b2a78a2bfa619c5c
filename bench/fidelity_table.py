"""One Markdown table of accuracy and fidelity from python.eval_gen JSON reports, floors first.

    python bench/fidelity_table.py docs/eval_ldm_fidelity.json docs/eval_gan_fidelity.json ... > table.md

Rows: the floors of the first report (a second set of real renders; the VAE's reconstructions of it), then every
setting of every report. Accuracy is the mean over the report's seeds; the fidelity figures are its first seed's
images on heldout.json (1,024 conditions unless --limit was given) against one fresh render per condition.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FILES = ("test.json", "new_test.json", "heldout.json")
HEADER = ("| setting | seeds | accuracy test / new_test / heldout | FD | KID x1000 | precision / recall | "
          "unrequested / missing objects | contrast / sharpness vs real | counted objects: more / fewer than asked |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def cells(fid: dict) -> str:
    fd = f"{fid['fd']:.1f}" + ("" if fid["fd_reliable"] else f" (n {fid['n_generated']}: biased)")
    return (f"{fd} | {fid['kid_x1000']:.0f} +- {fid['kid_std_x1000']:.0f} | {fid['precision']:.3f} / "
            f"{fid['recall']:.3f} | {fid['unrequested']:.3f} / {fid['missing']:.3f} | "
            f"{fid['contrast_ratio']:.3f} / {fid['sharpness_ratio']:.3f} | "
            + (f"{fid['counted_surplus']:.3f} / {fid['counted_deficit']:.3f}" if "counted_surplus" in fid else "-"))


def setting_name(report: dict, row: dict) -> str:
    name = "LDM" if report["model"] == "ldm" else "GAN path"
    if row["steps"]:
        name += f", {report['sampler']} {row['steps']} steps, guidance {row['guidance']:g}"
        if row.get("apg_norm"):  # reports before 2026-12-05 have no apg_norm: classifier-free guidance
            name += f" (APG, norm cap {row['apg_norm']:g})"
        if row.get("class_scale"):  # reports before the fourteenth session have none: no classifier guidance
            name += f", classifier guidance {row['class_scale']:g}"
            if row.get("count_weight"):  # its count term (weights/guide/counter), since the fifteenth session
                name += f" with count term {row['count_weight']:g}"
            if row.get("class_iters", 1) > 1:  # descent steps on x_0 per sampler step, since the sixteenth session
                name += f", {row['class_iters']} descent steps"
    else:
        name += ", one pass"
    return name + (f", best of {report['best_of']}" if report["best_of"] > 1 else "")


def table(reports: list[dict], file: str = "heldout.json") -> str:
    lines = [HEADER]
    floors = reports[0]["fidelity"]["floors"][file]
    for key, label in (("real_vs_real", "floor: real renders vs real renders"),
                       ("vae_reconstruction", "floor: VAE reconstructions vs real renders")):
        lines.append(f"| {label} | | | {cells(floors[key])} |")
    for report in reports:
        for row in report["results"]:
            files = row["files"]
            acc = " / ".join(f"{files[f]['accuracy_mean']:.3f}" if f in files else "-" for f in FILES)
            lines.append(f"| {setting_name(report, row)} | {len(report['seeds'])} | {acc} | "
                         f"{cells(files[file]['fidelity'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="python.eval_gen --json outputs")
    parser.add_argument("--file", default="heldout.json", help="the condition file whose fidelity is tabled")
    args = parser.parse_args(argv)
    try:
        reports = [json.loads(p.read_text()) for p in args.reports]
        sys.stdout.write(table(reports, args.file))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: not eval_gen reports with fidelity figures for {args.file} ({type(e).__name__}: {e})",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
