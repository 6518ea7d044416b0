"""`parquet:URL` and `csv:URL`: tables, encoded column by column by data/tables.py, which writes its own shards
(two passes over the files: statistics, then encoded chunks)."""

from __future__ import annotations

from .base import Option, Source

TABLE_OPTIONS = (
    Option("--categorical", "tables: read these columns as categories", metavar="COL,..."),
    Option("--drop", "tables: leave these columns out", metavar="COL,..."),
    Option("--keep", "tables: store these key columns (e.g. an id) raw beside each shard, not modelled; encode --keep writes them",
           metavar="COL,..."),
    Option("--target", "tables: this categorical column is also the label (supervised variants)", metavar="COL"),
    Option("--max-categories", "tables: most distinct values of a categorical column (default 100)", int, 100),
)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def write_table(kind: str, url: str, dest: str, opts: dict, *, shard_size: int, overwrite: bool, progress: bool):
    from ..tables import TableOptions, shard_table

    table_opts = TableOptions(categorical=_names(opts.get("categorical")), drop=_names(opts.get("drop")),
                              keep=_names(opts.get("keep")), target=opts.get("target"),
                              max_categories=opts.get("max_categories", 100), test_fraction=opts.get("test_fraction", 0.1))
    return shard_table(kind, url, dest, table_opts, shard_size=shard_size, overwrite=overwrite, progress=progress)


def summary(m) -> str:
    kinds = [c["kind"][:4] for c in m.table["columns"]]
    return (f"{len(kinds)} columns ({kinds.count('cont')} continuous, {kinds.count('cate')} categorical) encoded as "
            f"{m.shape[-1]} values per row")


def table_source(kind: str) -> Source:
    return Source(scheme=kind, usage=f"{kind}:URL", options=TABLE_OPTIONS, summary=summary,
                  write=lambda url, dest, opts, **kw: write_table(kind, url, dest, opts, **kw))


PARQUET, CSV = table_source("parquet"), table_source("csv")
