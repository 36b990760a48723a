"""`fracfx train`: FP32, static and PFQ training recipes (and any registered method).

Flags keep the FracTrain reference names (--batch_size, --num_bits_schedule, ...); each also
accepts a dashed spelling (--batch-size). Every flag defaults to "unset" here and the defaults
live in fracfx.train.TrainConfig, so a resumed run can tell which flags were given explicitly.

    fracfx train --method pfq --arch cifar_resnet38 --epochs 3 --save_folder runs/pfq
    fracfx train --resume runs/pfq          # continue exactly where the checkpoint left off
    torchrun --nproc_per_node 2 -m fracfx train --method pfq --save_folder runs/pfq2   # DDP, see README
"""

from __future__ import annotations

import argparse
import dataclasses

from fracfx.errors import ConfigError

_D = None  # TrainConfig defaults, filled in lazily for the help texts


def _defaults():
    global _D
    if _D is None:
        from fracfx.train import TrainConfig

        _D = TrainConfig()
    return _D


def _flag(parser, name: str, **kwargs) -> None:
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, default=None, **kwargs)


def register(subparsers) -> None:
    from fracfx.train import available_methods

    d = _defaults()
    methods = available_methods()
    parser = subparsers.add_parser(
        "train", help="train with fp32 | static | pfq (| dfq | fractrain) precision, resumable",
        description="Train a model with a FracTrain precision recipe; writes metrics.jsonl, checkpoint.pt and "
        "summary.json to --save_folder. Methods: " + "; ".join(f"{n}: {m.help}" for n, m in methods.items()),
    )
    _flag(parser, "method", choices=list(methods), help=f"training recipe (default {d.method})")
    _flag(parser, "arch", help=f"model: zoo name, torchvision name or package.module:factory (default {d.arch})")
    _flag(parser, "dataset", choices=["fashion-mnist", "cifar10", "cifar100", "imagenet", "kjv", "wikitext103"],
          help=f"dataset (default {d.dataset}; kjv and wikitext103 are text, for --arch transformer_lm)")
    _flag(parser, "datadir", help="dataset folder (fashion-mnist: /usr/share/datasets/fashion-mnist; cifar: holds "
          "cifar-10-batches-py/ or cifar-100-python/; imagenet: holds train/ and val/; wikitext103: holds wiki.*.tokens; "
          "kjv: caches kjv/kjv.txt there, default ~/.cache/fracfx)")
    parser.add_argument("--download", action="store_const", const=True, default=None, help="cifar: download into --datadir if missing")
    _flag(parser, "train_subset", type=int, metavar="N", help="train on the first N training samples only")
    _flag(parser, "test_subset", type=int, metavar="N", help="evaluate on the first N test samples only")
    _flag(parser, "batch_size", type=int, help=f"training batch size (default {d.batch_size})")
    _flag(parser, "test_batch_size", type=int, help="evaluation batch size (default max(batch_size, 256))")
    length = parser.add_mutually_exclusive_group()
    _flag(length, "iters", type=int, help="training iterations")
    _flag(length, "epochs", type=float, help="training epochs, if --iters is not given (default 3)")
    _flag(parser, "lr", type=float, help=f"initial learning rate (default {d.lr})")
    _flag(parser, "lr_milestones", type=int, nargs="+", metavar="ITER", help="iterations where the LR is multiplied by --lr_gamma (default 50%% and 75%% of the run)")
    _flag(parser, "lr_gamma", type=float, help=f"LR decay factor at each milestone (default {d.lr_gamma})")
    _flag(parser, "optimizer", choices=["sgd", "adam"], help=f"sgd (FracTrain's recipes) or adam (transformers; --momentum unused) (default {d.optimizer})")
    _flag(parser, "momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    _flag(parser, "weight_decay", type=float, help=f"SGD weight decay (default {d.weight_decay})")
    lm = parser.add_argument_group("language model (--arch transformer_lm on --dataset kjv | wikitext103; default: the zoo's size)")
    _flag(lm, "context", type=int, help="tokens per training sequence (default 128)")
    _flag(lm, "d_model", type=int, help="model width (default 128)")
    _flag(lm, "n_layers", type=int, help="transformer blocks (default 2)")
    _flag(lm, "n_heads", type=int, help="attention heads, dividing --d_model (default 4)")
    static = parser.add_argument_group("static")
    _flag(static, "act_bits", type=int, help=f"activation bits, 0 = FP32 (default {d.act_bits})")
    _flag(static, "weight_bits", type=int, help=f"weight bits, 0 = FP32 (default {d.weight_bits}; dfq/fractrain: 4, their fixed weight precision)")
    _flag(static, "grad_bits", type=int, help=f"gradient bits, 0 = FP32 (default {d.grad_bits})")
    pfq = parser.add_argument_group("pfq")
    _flag(pfq, "num_bits_schedule", type=int, nargs="+", metavar="BITS", help=f"forward (activation and weight) bits per stage (default {' '.join(map(str, d.num_bits_schedule))})")
    _flag(pfq, "num_grad_bits_schedule", type=int, nargs="+", metavar="BITS", help=f"gradient bits per stage (default {' '.join(map(str, d.num_grad_bits_schedule))})")
    _flag(pfq, "num_turning_point", type=int, help=f"stage switches N (default {d.num_turning_point})")
    _flag(pfq, "initial_threshold", type=float, help=f"plateau threshold eps (default {d.initial_threshold}; the CIFAR scripts use 0.15)")
    _flag(pfq, "decay", type=float, help=f"eps multiplier at the 1st and 2nd turning points (default {d.decay}; CIFAR scripts 0.4)")
    _flag(pfq, "window", type=int, help="iterations per indicator window (default: iterations / 30, FRACTRAIN.md section 9)")
    _flag(parser, "keep_fp32", nargs="*", metavar="GLOB", help="module globs, @first, @last kept in FP32; no value = quantize all (default @last)")
    parser.add_argument("--no_stochastic_grad", "--no-stochastic-grad", dest="stochastic_grad", action="store_const", const=False,
                        default=None, help="round gradients to nearest instead of stochastically (deterministic; for comparisons)")
    ddp = parser.add_argument_group("data parallel (run under torchrun; --batch_size is the global batch)")
    ddp.add_argument("--sync_bn", "--sync-bn", action="store_const", const=True, default=None,
                     help="BatchNorm batch statistics over all ranks (as one process on the global batch)")
    ddp.add_argument("--sync_ranges", "--sync-ranges", action="store_const", const=True, default=None,
                     help="quantizer min/max ranges (activations, gradients) over all ranks")
    added: set[str] = set()
    for name, method in methods.items():
        fresh = [o for o in method.options if o.name not in added]
        if fresh:  # an option several methods declare (dfq and fractrain) is one flag, listed once
            group = parser.add_argument_group(name)
            for option in fresh:
                users = [m for m in methods.values() if any(o.name == option.name for o in m.options)]
                defaults = {m.name: next(o.default for o in m.options if o.name == option.name) for m in users}
                if len(set(map(str, defaults.values()))) > 1:
                    default = "default " + ", ".join(f"{m} {d}" for m, d in defaults.items())
                else:
                    default = f"default {option.default}" + ("" if len(users) == 1 else f"; {' and '.join(defaults)}")
                _flag(group, option.name, type=option.type, nargs=option.nargs, help=f"{option.help} ({default})")
                added.add(option.name)
    run = parser.add_argument_group("run")
    _flag(run, "eval_every", type=int, metavar="ITERS", help="evaluate, log and checkpoint every ITERS iterations (default: once per epoch, at least 10 times)")
    _flag(run, "save_folder", help=f"run directory (default {d.save_folder})")
    _flag(run, "resume", help="continue the run in this directory (or from this checkpoint.pt)")
    _flag(run, "seed", type=int, help=f"seed of everything: init, data order, augmentation, rounding (default {d.seed})")
    _flag(run, "workers", type=int, help=f"data loader worker processes (default {d.workers})")
    _flag(run, "device", help=f"torch device (default {d.device})")
    _flag(run, "threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--no_progress", "--no-progress", action="store_true", help="no live progress bar (it is off anyway when not on a terminal)")
    run.add_argument("--log_every", "--log-every", type=int, default=0, metavar="ITERS",
                     help="without the live bar, print a progress line every ITERS iterations (default: only at evaluations)")
    # Hidden, for the resume tests: SIGKILL this process right after iteration N (no cleanup at all).
    parser.add_argument("--crash_after", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--crash_rank", type=int, default=0, help=argparse.SUPPRESS)  # under torchrun: which rank, first attempt only
    parser.set_defaults(func=run_train)


_NOT_CONFIG = {"command", "func", "resume", "threads", "no_progress", "log_every", "crash_after", "crash_rank"}


def config_from_args(args):
    """A TrainConfig from the flags given explicitly, or None when none were given."""
    from fracfx.train import TrainConfig, available_methods

    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    option_names = {o.name for m in available_methods().values() for o in m.options}
    method = given.get("method", TrainConfig.__dataclass_fields__["method"].default)
    own = {o.name for o in available_methods()[method].options} if method in available_methods() else set()
    options = {}
    for name in option_names & set(given):
        value = given.pop(name)
        if name not in own:
            raise ConfigError(f"--{name} belongs to another method; --method {method} does not use it")
        options[name] = value
    if not given and not options:
        return None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in given.items() if k in fields}, options=options)


def _resumed_method(resume: str) -> str | None:
    """The method of the run being resumed (from its config.json, else its checkpoint); None if unreadable."""
    import json

    from fracfx.errors import FracfxError
    from fracfx.train import CONFIG, resolve_checkpoint

    try:
        path = resolve_checkpoint(resume)
    except FracfxError:
        return None  # train() reports the missing checkpoint
    try:
        return json.loads((path.parent / CONFIG).read_text(encoding="utf-8"))["config"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        from fracfx.runtime.checkpoint import load_checkpoint

        return load_checkpoint(path)["config"]["method"]


def run_train(args) -> int:
    import torch

    from fracfx.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume is not None and args.method is None:
        args.method = _resumed_method(args.resume)  # so method-specific flags given on resume are read as that method's
    config = config_from_args(args)
    if args.resume is None and config is None:
        config = TrainConfig()
    try:
        train(config, resume=args.resume, progress=False if args.no_progress else None, log_every=args.log_every,
              crash_after=args.crash_after, crash_rank=args.crash_rank)
    except KeyboardInterrupt:
        import sys

        run_dir = args.resume or config.save_folder
        print(f"fracfx train: interrupted; continue from the last checkpoint with: fracfx train --resume {run_dir}", file=sys.stderr)
        return 130
    return 0
