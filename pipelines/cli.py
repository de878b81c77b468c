"""The ``recsys data ...`` commands (registered into the ``recsys`` parser through the ``recsys.commands`` entry point).

    recsys data build --dataset NAME [--raw-dir DIR] [--data-root DIR] [--on-bad-lines error|skip] [--force]
                      [--set key=value ...]
    recsys data build --dataset MYNAME --input FILE [--format csv|parquet|p5] [--user-col C] [--item-col C]
                      [--time-col C] [--rating-col C] [--sep ,]
    recsys data build ... --engine spark [--spark-master URL] [--spark-conf key=value ...]
    recsys data list

``data build`` prints only the processed dataset's path on stdout (scripts capture it); everything
else goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .build import ENGINES, Engine, GenericInput, build_dataset, load_catalogue
from .rawio import ON_BAD_LINES


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings → dict; a value is read as JSON when it parses (numbers, true, null, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def add_engine_arguments(parser) -> None:
    """--engine / --spark-master / --spark-conf, shared by every command that may build a dataset."""
    group = parser.add_argument_group("engine (how a missing dataset is built; docs/pipelines-at-scale.md)")
    group.add_argument("--engine", choices=ENGINES, default="inprocess",
                       help="inprocess (default): pyarrow/pandas in this process; spark: Apache Spark (extra [spark])")
    group.add_argument("--spark-master", default=None, help="Spark master URL (default local[*]), e.g. spark://host:7077")
    group.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                       help="a Spark setting, e.g. --spark-conf spark.driver.memory=4g; repeatable")


def engine_from_args(args) -> Engine:
    conf = []
    for pair in args.spark_conf:
        if "=" not in pair:
            raise ValueError(f"--spark-conf expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        conf.append((key.strip(), value.strip()))
    return Engine(args.engine, args.spark_master, tuple(conf))


def cmd_build(args) -> int:
    generic = None
    if args.input:
        generic = GenericInput(Path(args.input), args.format, args.user_col, args.item_col, args.time_col,
                               args.rating_col, args.sep)
    path = build_dataset(args.dataset, args.raw_dir, data_root=args.data_root, on_bad_lines=args.on_bad_lines,
                         force=args.force, generic=generic, engine=engine_from_args(args), **parse_settings(args.set))
    print(path)
    return 0


def cmd_list(args) -> int:
    for name, entry in load_catalogue().items():
        print(f"{name:15s} {entry['description']}")
    return 0


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="build processed datasets from raw files")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    build = data_sub.add_parser("build", help="raw files -> data/processed/<name> (prints its path)")
    build.add_argument("--dataset", required=True, help="a catalogue name (recsys data list) or your own name")
    build.add_argument("--raw-dir", default=None, help="directory with the raw files (no download)")
    build.add_argument("--data-root", default=None, help="root of raw/ and processed/ (default ./data)")
    build.add_argument("--on-bad-lines", choices=ON_BAD_LINES, default="error",
                       help="stop at the first malformed line (default) or skip and count them")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="cleaning/split/generator setting, e.g. --set min_user_interactions=3")
    own = build.add_argument_group("your own log (--input)")
    add_engine_arguments(build)
    own.add_argument("--input", default=None, help="a CSV/Parquet log or a P5 'user item item ...' file; a directory "
                     "of part files or a glob (quoted) reads every part in path order")
    own.add_argument("--format", choices=["csv", "parquet", "p5"], default=None)
    own.add_argument("--user-col", default="user_id")
    own.add_argument("--item-col", default="item_id")
    own.add_argument("--time-col", default="timestamp")
    own.add_argument("--rating-col", default=None)
    own.add_argument("--sep", default=",")
    build.set_defaults(func=cmd_build)

    listing = data_sub.add_parser("list", help="the named datasets of data/catalogue.json")
    listing.set_defaults(func=cmd_list)
