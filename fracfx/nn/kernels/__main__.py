"""python -m fracfx.nn.kernels [--build] [--verbose]: build (if needed) and load the fused kernels."""

from __future__ import annotations

import argparse
import sys

from fracfx.nn import kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracfx.nn.kernels", description=__doc__)
    parser.add_argument("--build", action="store_true", help="build the kernels now (else only report whether they load)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    name, cflags = kernels.build_key()
    ok = kernels.load(build=args.build, verbose=args.verbose)
    where = kernels.cache_dir() / name
    if ok:
        print(f"fracfx kernels: ok ({where})")
        return 0
    print(f"fracfx kernels: unavailable ({kernels.unavailable_reason()}); fracfx will use its eager torch quantizers", file=sys.stderr)
    return 0 if not args.build else 1


if __name__ == "__main__":
    sys.exit(main())
