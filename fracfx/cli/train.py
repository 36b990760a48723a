"""`fracfx train`: every registered training method (fp32, static, pfq, dfq, fractrain).

Every flag defaults to "unset" here and the defaults live in fracfx.train.TrainConfig and the
methods' Options, so a resumed run can tell which flags were given explicitly.

    fracfx train --method pfq --arch cifar_resnet38 --epochs 3 --save-folder runs/pfq
    fracfx train --resume runs/pfq          # continue exactly where the checkpoint left off
    torchrun --nproc_per_node 2 -m fracfx train --method pfq --save-folder runs/pfq2   # DDP, see README
"""

from __future__ import annotations

import dataclasses

from fracfx.cli.flags import add_flag
from fracfx.errors import ConfigError

DATASETS = ["fashion-mnist", "cifar10", "cifar100", "imagenet", "kjv", "wikitext103"]
_NOT_CONFIG = {"command", "func", "resume", "threads", "no_progress", "log_every"}


def _flag(container, name: str, **kwargs) -> None:
    add_flag(container, f"--{name}", dest=name, default=None, **kwargs)


def register(subparsers) -> None:
    from fracfx.train import TrainConfig, available_methods

    d, methods = TrainConfig(), available_methods()
    parser = subparsers.add_parser(
        "train", help="train with fp32 | static | pfq | dfq | fractrain precision, resumable",
        description="Train a model with a FracTrain precision recipe; writes metrics.jsonl, checkpoint.pt and "
        "summary.json to --save-folder. Methods: " + "; ".join(f"{n}: {m.help}" for n, m in methods.items()),
    )
    _flag(parser, "method", choices=list(methods), help=f"training recipe (default {d.method})")
    _flag(parser, "arch", help=f"model: zoo name, torchvision name or package.module:factory (default {d.arch})")
    _flag(parser, "dataset", choices=DATASETS, help=f"dataset (default {d.dataset}; kjv and wikitext103 are text, for --arch transformer_lm)")
    _flag(parser, "datadir", help="dataset folder (fashion-mnist: /usr/share/datasets/fashion-mnist; cifar: holds "
          "cifar-10-batches-py/ or cifar-100-python/; imagenet: holds train/ and val/; wikitext103: holds wiki.*.tokens; "
          "kjv: caches kjv/kjv.txt there, default ~/.cache/fracfx)")
    _flag(parser, "download", action="store_const", const=True, help="cifar: download into --datadir if missing")
    _flag(parser, "train_subset", type=int, metavar="N", help="train on the first N training samples only")
    _flag(parser, "test_subset", type=int, metavar="N", help="evaluate on the first N test samples only")
    _flag(parser, "batch_size", type=int, help=f"training batch size (default {d.batch_size})")
    _flag(parser, "test_batch_size", type=int, help="evaluation batch size (default max(batch_size, 256))")
    length = parser.add_mutually_exclusive_group()
    _flag(length, "iters", type=int, help="training iterations")
    _flag(length, "epochs", type=float, help="training epochs, if --iters is not given (default 3)")
    _flag(parser, "lr", type=float, help=f"initial learning rate (default {d.lr})")
    _flag(parser, "lr_milestones", type=int, nargs="+", metavar="ITER", help="iterations where the LR is multiplied by --lr-gamma (default 50%% and 75%% of the run)")
    _flag(parser, "lr_gamma", type=float, help=f"LR decay factor at each milestone (default {d.lr_gamma})")
    _flag(parser, "optimizer", choices=["sgd", "adam"], help=f"sgd (FracTrain's recipes) or adam (transformers; --momentum unused) (default {d.optimizer})")
    _flag(parser, "momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    _flag(parser, "weight_decay", type=float, help=f"SGD weight decay (default {d.weight_decay})")
    _flag(parser, "window", type=int, help="iterations per indicator window (pfq, fractrain; dfq's cp trace) (default: iterations / 30, docs/method.md section 9)")
    _flag(parser, "keep_fp32", nargs="*", metavar="GLOB", help="module globs, @first, @last kept in FP32; no value = quantize all (default @last)")
    add_flag(parser, "--no-stochastic-grad", dest="stochastic_grad", action="store_const", const=False, default=None,
             help="round gradients to nearest instead of stochastically (deterministic; for comparisons)")
    lm = parser.add_argument_group("language model (--arch transformer_lm on --dataset kjv | wikitext103; default: the zoo's size)")
    _flag(lm, "context", type=int, help="tokens per training sequence (default 128)")
    _flag(lm, "d_model", type=int, help="model width (default 128)")
    _flag(lm, "n_layers", type=int, help="transformer blocks (default 2)")
    _flag(lm, "n_heads", type=int, help="attention heads, dividing --d-model (default 4)")
    _method_options(parser, methods)
    ddp = parser.add_argument_group("data parallel (run under torchrun; --batch-size is the global batch)")
    _flag(ddp, "sync_bn", action="store_const", const=True, help="BatchNorm batch statistics over all ranks (as one process on the global batch)")
    _flag(ddp, "sync_ranges", action="store_const", const=True, help="quantizer min/max ranges (activations, gradients) over all ranks")
    run = parser.add_argument_group("run")
    _flag(run, "eval_every", type=int, metavar="ITERS", help="evaluate, log and checkpoint every ITERS iterations (default: once per epoch, at least 10 times)")
    _flag(run, "save_folder", help=f"run directory (default {d.save_folder})")
    _flag(run, "resume", help="continue the run in this directory (or from this checkpoint.pt)")
    _flag(run, "seed", type=int, help=f"seed of everything: init, data order, augmentation, rounding (default {d.seed})")
    _flag(run, "workers", type=int, help=f"data loader worker processes (default {d.workers})")
    _flag(run, "device", help=f"torch device (default {d.device})")
    _flag(run, "threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_flag(run, "--no-progress", action="store_true", help="no live progress bar (it is off anyway when not on a terminal)")
    add_flag(run, "--log-every", type=int, default=0, metavar="ITERS",
             help="without the live bar, print a progress line every ITERS iterations (default: only at evaluations)")
    parser.set_defaults(func=run_train)


def _method_options(parser, methods) -> None:
    """One flag per option name; an option several methods declare is listed once, with each method's default."""
    added: set[str] = set()
    for name, method in methods.items():
        fresh = [o for o in method.options if o.name not in added]
        if not fresh:
            continue
        group = parser.add_argument_group(name)
        for option in fresh:
            defaults = {m.name: next(o.default for o in m.options if o.name == option.name)
                        for m in methods.values() if any(o.name == option.name for o in m.options)}
            shown = {m: " ".join(map(str, d)) if isinstance(d, tuple) else str(d) for m, d in defaults.items()}
            if len(set(shown.values())) > 1:
                default = "default " + ", ".join(f"{m} {d}" for m, d in shown.items())
            else:
                default = f"default {next(iter(shown.values()))}; {', '.join(shown)}"
            _flag(group, option.name, type=option.type, nargs=option.nargs, help=f"{option.help} ({default})".replace("%", "%%"))
            added.add(option.name)


def config_from_args(args):
    """A TrainConfig from the flags given explicitly, or None when none were given."""
    from fracfx.train import TrainConfig, available_methods

    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    if not given:
        return None
    method = given.get("method", TrainConfig.__dataclass_fields__["method"].default)
    if method in available_methods():
        for name in set(given) - {f.name for f in dataclasses.fields(TrainConfig)}:
            if all(o.name != name for o in available_methods()[method].options):
                raise ConfigError(f"--{name.replace('_', '-')} belongs to another method; --method {method} does not use it")
    return TrainConfig(**given)


def run_train(args) -> int:
    import torch

    from fracfx.train import TrainConfig, train
    from fracfx.train.run_folder import saved_method

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume is not None and args.method is None:
        args.method = saved_method(args.resume)  # so method-specific flags given on resume are read as that method's
    config = config_from_args(args)
    if args.resume is None and config is None:
        config = TrainConfig()
    try:
        train(config, resume=args.resume, progress=False if args.no_progress else None, log_every=args.log_every)
    except KeyboardInterrupt:
        import sys

        run_dir = args.resume or config.save_folder
        print(f"fracfx train: interrupted; continue from the last checkpoint with: fracfx train --resume {run_dir}", file=sys.stderr)
        return 130
    return 0
