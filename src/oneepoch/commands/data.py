"""``oneepoch data``: synth, stats, validate, risk (and prepare, for public data sets)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make, inspect and check data sets")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    s = dsub.add_parser("synth", help="write the built-in synthetic CTR data set",
                        description="Write a production-like synthetic CTR data set with paper "
                        "A's seven fields (train + next-day test split) drawn from a hidden "
                        "ground-truth model; prints the ground-truth AUC ceiling.")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--rows", type=int, help="training rows (default 400000)")
    s.add_argument("--test-rows", type=int, help="test rows (default 50000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="other generator settings (see docs/synthetic.md), e.g. n_items=200000")
    add_surface_options(s)
    s.set_defaults(func=synth)

    st = dsub.add_parser("stats", help="per-field ID statistics (paper A Table 1) + Fig. 10",
                         description="Print unique IDs and mean occurrences per field of the "
                         "train split and write stats.json, stats.md and id_frequency.png.")
    st.add_argument("dir", help="data-set folder")
    st.add_argument("--split", default="train")
    st.add_argument("--out", help="where to write the files (default: DIR/stats)")
    st.set_defaults(func=stats)

    v = dsub.add_parser("validate", help="check a data set and report the first problem",
                        description="Check schema.yaml, columns, types, labels and sequence "
                        "lengths of every split; exit 2 with a message naming file and column "
                        "(an evaluation split with a single class is an error, a train split "
                        "with one a warning). Also prints, per evaluation split and field, the "
                        "share of IDs unseen in train (out of vocabulary).")
    v.add_argument("dir", help="data-set folder")
    v.set_defaults(func=validate)

    r = dsub.add_parser("risk", help="before training: share of test rows on rare IDs",
                        description="Per ID field, the share of test rows (and of distinct IDs) "
                        "whose ID occurs at most k times (k = 0, 1, 2, 5, 10) in the training "
                        "split, and the rule's expectation of a one-epoch drop (see "
                        "docs/diagnostics.md). One streaming pass over each split; writes "
                        "risk.json, risk.md and risk.png.")
    r.add_argument("dir", help="data-set folder")
    r.add_argument("--field", action="append", default=[], metavar="NAME",
                   help="report only this ID field (repeatable; default: every single-ID field)")
    r.add_argument("--train-split", default="train")
    r.add_argument("--test-split", default="test")
    r.add_argument("--batch-rows", type=int, default=1 << 20,
                   help="rows per streamed batch (memory knob; default 1048576)")
    r.add_argument("--out", help="where to write the files (default: DIR/risk)")
    r.set_defaults(func=risk)

    register_prepare(dsub)


def synth(args: argparse.Namespace) -> int:
    from oneepoch.config import parse_overrides
    from oneepoch.data.synthetic import SynthConfig, write_synthetic

    kw = parse_overrides(args.set)
    if args.rows:
        kw["n_train"] = args.rows
    if args.test_rows:
        kw["n_test"] = args.test_rows
    kw["seed"] = args.seed
    if getattr(args, "surfaces", None):
        return synth_surfaces(args, kw)
    info = write_synthetic(args.out, SynthConfig.from_dict(kw))  # checked before writing
    print(f"wrote {args.out}: {info['rows']['train']:,} train / {info['rows']['test']:,} test rows")
    print(f"ground-truth AUC on test (ceiling): {info['ground_truth_auc_test']:.4f}")
    print(f"item IDs in train: {info['item_ids_in_train']:,}; the least frequent half of them "
          f"hold {100 * info['item_tail_share']:.1f}% of item occurrences")
    return 0


def stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from oneepoch.data.dataset import load_ctr
    from oneepoch.data.stats import field_stats, format_stats, write_stats

    data = load_ctr(args.dir, [args.split] if args.split != "train" else None)
    print(format_stats(field_stats(data, args.split), len(data.splits[args.split])))
    paths = write_stats(data, args.out or Path(args.dir) / "stats", args.split)
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


def risk(args: argparse.Namespace) -> int:
    from pathlib import Path

    from oneepoch.data.risk import data_risk, format_risk, write_risk

    r = data_risk(args.dir, args.field or None, args.train_split, args.test_split,
                  batch_rows=args.batch_rows)
    print(format_risk(r))
    paths = write_risk(r, args.out or Path(args.dir) / "risk")
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


def validate(args: argparse.Namespace) -> int:
    from oneepoch.data.dataset import validate as check

    for line in check(args.dir):
        print(line)
    print("ok")
    return 0


# ----------------------------------------------------------------------------- prepare
# ``oneepoch data prepare NAME --raw PATH --out DIR``: public data sets from their raw files
# (issue 5; the preparers live in oneepoch/data/prepare/).


def register_prepare(dsub: argparse._SubParsersAction) -> None:
    from oneepoch.data.prepare import PREPARERS

    lines = []
    for p in PREPARERS.values():
        lines += [f"{p.name}: {p.summary}", f"  --raw: {p.raw}",
                  "  options: " + " ".join(p.option_help()), ""]
    pp = dsub.add_parser(
        "prepare", help="prepare a public data set from raw files you already have",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a data set in the project's format (Parquet + schema.yaml, plus "
        "prepare.md with rows read / dropped and per-field statistics, and engagements/ for "
        "pre-training where the source allows) from raw files. Nothing is downloaded.",
        epilog="data sets (options: name=default, or name=default|other for one with "
        "choices; typos and out-of-range values are refused before anything is read):\n\n"
        + "\n".join(lines) + "example: oneepoch data prepare "
        "movielens --raw ml-100k/ --out data/ml100k --set threshold=4 max_len=20")
    pp.add_argument("name", choices=sorted(PREPARERS), metavar="NAME",
                    help="one of: " + ", ".join(sorted(PREPARERS)))
    pp.add_argument("--raw", required=True, help="raw file or folder (see below)")
    pp.add_argument("--out", required=True, help="output data-set folder")
    pp.add_argument("--seed", type=int, help="random seed (negatives, splits; default 0)")
    pp.add_argument("--max-len", type=int, help="history length")
    pp.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="preparer options (listed below)")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    pp.add_argument("--quiet", action="store_true", help="no progress lines")
    pp.set_defaults(func=prepare_cmd)


def prepare_cmd(args: argparse.Namespace) -> int:
    from oneepoch.config import parse_overrides
    from oneepoch.data.prepare import prepare

    opts = parse_overrides(args.set)  # typed and checked by the preparer's options dataclass
    if args.seed is not None:
        opts["seed"] = args.seed
    if args.max_len is not None:
        opts["max_len"] = args.max_len
    summary = prepare(args.name, args.raw, args.out, opts, overwrite=args.overwrite,
                      progress=not args.quiet)
    for split, n in summary["samples"].items():
        print(f"{split}: {n:,} samples, positive rate {summary['positive_rate'][split]:.4f}")
    for reason, n in summary["dropped"].items():
        print(f"dropped {n:,}: {reason}")
    print(f"wrote {args.out} ({summary['seconds']:.1f} s); summary: {args.out}/prepare.md")
    return 0


# ----------------------------------------------------------------------------- surfaces
# ``oneepoch data synth --surfaces homefeed,related --out DIR``: paper B's multi-surface world
# (per-surface CTR data with user_ID + an engagement log for pre-training; issue 4).


def add_surface_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--surfaces", metavar="A,B",
                   help="multi-surface mode (paper B): comma-separated surfaces of one world "
                   "(homefeed, related, search); writes DIR/<surface>/ CTR data (train / valid / "
                   "test, with user_ID) and DIR/engagements/; --rows and --test-rows are then "
                   "per surface")
    s.add_argument("--engagement-ratio", type=float,
                   help="engagements written per training row of one surface (default 20)")


def synth_surfaces(args: argparse.Namespace, kw: dict) -> int:
    from oneepoch.config import from_dict
    from oneepoch.data.synthetic import SurfacesConfig, SynthConfig, write_multisurface

    # --rows / --test-rows are per surface; every other --set key is a world setting
    d: dict = {k: kw.pop(k) for k in ("n_train", "n_test") if k in kw}
    if "n_test" in d:
        d["n_valid"] = d["n_test"]
    world = SynthConfig.from_dict(kw, base=SurfacesConfig().world)
    d["surfaces"] = [x for x in args.surfaces.split(",") if x]
    if args.engagement_ratio:
        d["engagement_ratio"] = args.engagement_ratio
    cfg = from_dict(SurfacesConfig, d, base=SurfacesConfig(world=world))
    info = write_multisurface(args.out, cfg)
    print(f"wrote {args.out}/engagements: {info['engagements']['train']:,} engagements "
          f"(+ {info['engagements']['test']:,} held out)")
    for name, d in info["surfaces"].items():
        cov = info["coverage"][name]
        print(f"wrote {args.out}/{name}: {d['rows']['train']:,} train / {d['rows']['valid']:,} "
              f"valid / {d['rows']['test']:,} test rows; ground-truth test AUC "
              f"{d['ground_truth_auc_test']:.4f}; {cov['engagements_per_train_row']:.1f} "
              f"engagements per train row; {100 * cov['tail_items_in_log']:.1f}% of test tail "
              "items in the log")
    return 0

