"""`tensorgate package SOURCE --name NAME --repo DIR …` and `tensorgate package-verify --repo DIR --name NAME`.

Exit codes: 0 packaged (or already packaged: the same content is the same version) / verified;
1 verification failed (a tampered version); 2 bad input or a refusal (an overwrite, a config that
does not fit, a signature that cannot be read), the message naming the path or the option to supply.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from gateway.packaging.dockerfile import write_build_context
from gateway.packaging.errors import PackageError, TamperedPackage
from gateway.packaging.package import PackageRequest, package
from gateway.packaging.repository import verify_model, verify_version
from gateway.packaging.signature import parse_tensor_option

EXIT_FAILED = 1
EXIT_REFUSED = 2


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
            print(f"build context: {context} (sha256 {hashlib.sha256(data).hexdigest()}); "
                  f"docker build - < {context}  (production), docker build -f Dockerfile.cpu - < {context}  (CPU)")
    except PackageError as error:
        print(f"tensorgate package: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


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
