"""``oneepoch data``: synth, stats, validate (and prepare, for public data sets)."""

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
                        "lengths of every split; exit 2 with a message naming file and column.")
    v.add_argument("dir", help="data-set folder")
    v.set_defaults(func=validate)


def synth(args: argparse.Namespace) -> int:
    import yaml

    from oneepoch.data.synthetic import SynthConfig, write_synthetic

    kw = {}
    for item in args.set:
        k, _, val = item.partition("=")
        kw[k] = yaml.safe_load(val)
    if args.rows:
        kw["n_train"] = args.rows
    if args.test_rows:
        kw["n_test"] = args.test_rows
    kw["seed"] = args.seed
    info = write_synthetic(args.out, SynthConfig.from_dict(kw))
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


def validate(args: argparse.Namespace) -> int:
    from oneepoch.data.dataset import validate as check

    for line in check(args.dir):
        print(line)
    print("ok")
    return 0
