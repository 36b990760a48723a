"""`fracfx demo`: train, fix precision, export, verify and report, on offline Fashion-MNIST."""

from __future__ import annotations

from fracfx.cli.flags import add_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the main job end to end on Fashion-MNIST (a few minutes on 2 CPU cores)")
    add_flag(parser, "--method", default="fractrain", help="training recipe: fractrain (default), dfq, pfq, static, fp32")
    add_flag(parser, "--arch", default="cifar_resnet38")
    add_flag(parser, "--iters", type=int, default=200, help="training iterations (default 200)")
    add_flag(parser, "--batch-size", type=int, default=128)
    add_flag(parser, "--out", default="runs/demo", help="output folder (run, ONNX files, report.png)")
    add_flag(parser, "--seed", type=int, default=0)
    add_flag(parser, "--test-subset", type=int, default=None, help="evaluate on the first N test images only (quick checks)")
    add_flag(parser, "--no-progress", action="store_true", help="no live progress display")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fracfx.demo import run_demo

    result = run_demo(
        method=args.method, arch=args.arch, iters=args.iters, batch_size=args.batch_size, out=args.out,
        seed=args.seed, test_subset=args.test_subset, progress=False if args.no_progress else None,
    )
    return 0 if result.summary["onnx_contract_met"] else 1
