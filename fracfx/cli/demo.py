"""`fracfx demo`: train, fix precision, export, verify and report, on offline Fashion-MNIST."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the main job end to end on Fashion-MNIST (a few minutes on 2 CPU cores)")
    parser.add_argument("--method", default="fractrain", help="training recipe: fractrain (default), dfq, pfq, static, fp32")
    parser.add_argument("--arch", default="cifar_resnet38")
    parser.add_argument("--iters", type=int, default=200, help="training iterations (default 200)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--out", default="runs/demo", help="output folder (run, ONNX files, report.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test_subset", type=int, default=None, help="evaluate on the first N test images only (quick checks)")
    parser.add_argument("--no_progress", action="store_true", help="no live progress display")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fracfx.demo import run_demo

    result = run_demo(
        method=args.method, arch=args.arch, iters=args.iters, batch_size=args.batch_size, out=args.out,
        seed=args.seed, test_subset=args.test_subset, progress=False if args.no_progress else None,
    )
    return 0 if result.summary["onnx_contract_met"] else 1
