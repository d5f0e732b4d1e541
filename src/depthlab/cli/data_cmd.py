"""`depthlab data prepare|info`: prepare token shards from a corpus, or describe a prepared folder."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("data", help=help_, description="Prepare token shards from a corpus, or describe a "
                       "prepared dataset folder.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    prep = actions.add_parser("prepare", help="tokenize a corpus into train/val token shards",
                              description="Tokenize a corpus into train.bin/val.bin (split by document), with its "
                              "tokenizer and meta.json. Re-running with the same settings is a no-op.")
    prep.add_argument("--source", default="shakespeare", metavar="shakespeare|PATH|hf:NAME",
                      help="'shakespeare' (bundled, default), a .txt/.jsonl/.parquet file or folder, or "
                      "hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset name or local path)")
    prep.add_argument("--tokenizer", default="bpe", metavar="bpe|PATH|HUB_ID",
                      help="'bpe' (train a byte-level BPE, default), or a tokenizer.json, tokenizer folder or hub id")
    prep.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                      help="BPE vocabulary size (default 4096)")
    prep.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                      help="share of documents held out (default 0.05)")
    common.add_seed(prep, "seed of the train/validation split")
    prep.add_argument("--text-field", default="text", metavar="F",
                      help="JSONL field / parquet or dataset column of the text (default 'text')")
    common.add_out(prep, "output folder (may be omitted for the bundled corpus with bpe: then the depthlab cache); "
                   "train on it with --data.path=DIR")
    common.add_json(prep, "the dataset's meta.json")
    prep.add_argument("--overwrite", action="store_true", help="replace a folder holding a different dataset")
    info = actions.add_parser("info", help="describe a prepared dataset folder",
                              description="Print what a prepared dataset folder holds.")
    info.add_argument("dir", help="prepared dataset folder")
    info.add_argument("--verify", action="store_true", help="also re-hash the tokenizer and shards against meta.json")
    common.add_json(info, "the dataset's meta.json")
    p.set_defaults(func=run, usage=p.format_usage)


def run(args) -> int:
    from depthlab.data import TokenDataset, prepare_data  # imported here: building the parser stays fast

    if args.action == "prepare":
        path = prepare_data(args.source, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.seed,
                            args.text_field, args.overwrite)
        dataset = TokenDataset(path)
        if not common.emit_json(args, {"path": str(dataset.path), **dataset.meta}):
            print(_summary(dataset))
            print(f"train on it: depthlab train --preset tiny --data.path={dataset.path} --out runs/NAME")
        return 0
    if args.action == "info":
        dataset = TokenDataset(args.dir)
        if args.verify:
            dataset.verify()
        if not common.emit_json(args, {"path": str(dataset.path), **dataset.meta, "verified": args.verify}):
            print(_summary(dataset) + ("\ntokenizer and shards verified: sha256 match meta.json" if args.verify else ""))
        return 0
    print(args.usage(), end="")
    return 2


def _summary(dataset) -> str:
    """What a prepared folder holds, one line per fact."""
    meta = dataset.meta
    tokenizer = meta["tokenizer"]
    lines = [f"dataset   {dataset.path}",
             f"source    {meta['source']}",
             (f"tokenizer {tokenizer['spec']} (vocab {meta['vocab_size']:,}, eos {tokenizer['eos_id']}, "
             f"{meta['dtype']} shards)")]
    for split, stats in meta["splits"].items():
        lines.append(f"{split:9s} {stats['tokens']:>12,} tokens  {stats['documents']:>7,} documents  "
                     f"sha256 {stats['sha256'][:12]}")
    lines.append(f"settings  val_fraction {meta['settings']['val_fraction']}, seed {meta['settings']['seed']}, "
                 f"fingerprint {meta['fingerprint'][:12]}, prepared {meta['created']} by depthlab "
                 f"{meta['depthlab_version']}")
    return "\n".join(lines)
