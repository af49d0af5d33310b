"""`biformer label`: a teacher's score map of every training image, for token labelling (`train --token-label`)."""
from __future__ import annotations

import argparse
import json

from ._options import HelpFormatter, non_negative, positive


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label", help="make token labels: a teacher's score map per training image", formatter_class=HelpFormatter,
        description="Run a teacher classifier once over every training image of --data (the whole image resized to "
                    "its square input) and store, for each cell of its final feature map, the top-k classes and "
                    "their probabilities, in shards of --shard-size images under --output. An interrupted run "
                    "resumes at the first missing shard when run again; under torchrun each process labels its own "
                    "shards. `biformer train --token-label OUTPUT` crops the maps with the images.",
    )
    parser.add_argument("--teacher", required=True,
                        help="a classifier's weights file (ours, or an original release .pth with --teacher-model), "
                             "or a timm model name (timm's pretrained weights, downloaded by timm)")
    parser.add_argument("--teacher-model", default=None, help="the model of a --teacher file that does not name it")
    parser.add_argument("--data", default="digits", help="'digits' or a folder with train/<class>/*")
    parser.add_argument("--output", required=True, help="the labels folder (created if missing)")
    parser.add_argument("--img-size", type=positive, default=None,
                        help="the side of the square the teacher sees each image resized to (default: the teacher's)")
    parser.add_argument("--topk", type=positive, default=None,
                        help="classes kept per cell (default: 5, as LV-ViT, or all where there are fewer)")
    parser.add_argument("--batch-size", type=positive, default=32, help="images per forward pass")
    parser.add_argument("--shard-size", type=positive, default=1024,
                        help="images per shard file (the unit an interrupted run resumes at)")
    parser.add_argument("--workers", type=non_negative, default=0, help="image decoding processes")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tasks.labelling import label_images

    counts = label_images(args.teacher, args.data, args.output, teacher_model=args.teacher_model,
                          img_size=args.img_size, topk=args.topk, batch_size=args.batch_size,
                          shard_size=args.shard_size, workers=args.workers, device=args.device)
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"{args.output}: labelled {counts['labelled_now']} image(s) now; {counts['shards'] - counts['missing_shards']}"
          f" of {counts['shards']} shard(s) hold all {counts['images']} training images"
          + (f"; {counts['unreadable']} unreadable image(s) were skipped" if counts["unreadable"] else "")
          + (" (the other processes' shards are still to come)" if counts["missing_shards"] else ""))
    return 0
