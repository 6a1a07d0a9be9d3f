"""`tensorgate package SOURCE --name NAME --repo DIR …` and `tensorgate package-verify --repo DIR --name NAME`.

Exit codes: 0 packaged (or already packaged: the same content is the same version) / verified;
1 verification failed (a tampered version); 2 bad input or a refusal (an overwrite, a config that
does not fit, a signature that cannot be read), the message naming the path or the option to supply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.packaging.dockerfile import write_build_context
from gateway.packaging.errors import PackageError, TamperedPackage
from gateway.packaging.package import BACKENDS, KINDS, PackageRequest, package
from gateway.packaging.repository import verify_model, verify_version
from gateway.packaging.signature import parse_tensor_option

EXIT_FAILED = 1
EXIT_REFUSED = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a model file (.onnx, TorchScript .pt, scikit-learn/XGBoost/LightGBM .joblib or "
                                       ".pkl, XGBoost .json/.ubj, LightGBM .txt) or module:function (NumPy in and out)")
    parser.add_argument("--name", required=True, help="the model's name (its folder in the repository)")
    parser.add_argument("--repo", required=True, help="the Triton model repository to write into")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="what the source is (default: from its name/content)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="onnxruntime / pytorch: Triton's framework backend (production images); python: "
                             "tensorgate's Python-based backend running the same file (the wheel's Triton); auto: "
                             "python where the local Triton lacks the framework backend (default)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="Triton's max_batch_size (default: 64 when the model's first dimension is free, else 0)")
    parser.add_argument("--dynamic-batching", action="store_true", help="let Triton batch requests (dynamic_batching)")
    parser.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batching's max queue delay (µs)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME:DTYPE:DIMS",
                        help="declare an input (TorchScript and callables), e.g. x:FP32:-1,4 (-1 = any size); repeat per input")
    parser.add_argument("--output", action="append", default=[], metavar="NAME:DTYPE:DIMS", help="declare an output")
    parser.add_argument("--example", help="an example input (.npy, or .npz keyed by input name) to probe the signature")
    parser.add_argument("--reference", help="drift reference rows (.npy for one input, .npz keyed by input name), "
                                            "stored with the package for a rollout to install")
    parser.add_argument("--version", type=int, help="the version number (default: the next one)")
    parser.add_argument("--audit-log", help="the audit log (default: $TENSORGATE_AUDIT_LOG, else REPO/tensorgate-audit.jsonl)")
    parser.add_argument("--actor", help="who packages (default: $TENSORGATE_ACTOR, else user@host)")
    parser.add_argument("--reason", default="", help="why, for the audit log")
    parser.add_argument("--dockerfile", action="store_true",
                        help="also write a reproducible Docker build context (a tar) for this version")
    parser.add_argument("--context", help="where --dockerfile writes the context (default: NAME-VERSION.context.tar here)")


def cmd_package(args: argparse.Namespace) -> int:
    try:
        request = PackageRequest(
            source=args.source, name=args.name, repository=Path(args.repo), kind=args.kind, backend=args.backend,
            max_batch_size=args.max_batch_size, dynamic_batching=args.dynamic_batching,
            max_queue_delay_us=args.max_queue_delay_us,
            inputs=tuple(parse_tensor_option(t, "--input") for t in args.input),
            outputs=tuple(parse_tensor_option(t, "--output") for t in args.output),
            example=Path(args.example) if args.example else None,
            reference=Path(args.reference) if args.reference else None,
            version=args.version, audit_log=Path(args.audit_log) if args.audit_log else None,
            actor=args.actor, reason=args.reason,
        )
        result = package(request)
        state = "packaged as" if result.created else "already packaged as"
        print(f"{args.name}: {state} version {result.version} ({result.digest}), backend {result.backend}: {result.path}")
        if args.dockerfile:
            context = Path(args.context or f"{args.name}-{result.version}.context.tar")
            data = write_build_context(result.packaged.model_dir, result.version, context)
            import hashlib

            print(f"build context: {context} (sha256 {hashlib.sha256(data).hexdigest()}); "
                  f"docker build - < {context}  (production), docker build -f Dockerfile.cpu - < {context}  (CPU)")
    except PackageError as error:
        print(f"tensorgate package: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="the model repository")
    parser.add_argument("--name", required=True, help="the model")
    parser.add_argument("--version", type=int, help="one version (default: every version)")


def cmd_package_verify(args: argparse.Namespace) -> int:
    model_dir = Path(args.repo) / args.name
    try:
        manifests = {args.version: verify_version(model_dir, args.version)} if args.version else verify_model(model_dir)
    except TamperedPackage as error:
        print(f"tensorgate package-verify: REFUSED: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    except PackageError as error:
        print(f"tensorgate package-verify: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    for version, manifest in sorted(manifests.items()):
        print(f"{args.name} version {version}: ok ({manifest['digest']}, backend {manifest['backend']})")
    return 0
