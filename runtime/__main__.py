"""The one runtime entrypoint: ``python -m opbox.runtime {worker,run,serve} ...``.

  worker            a warm worker: pull runs of one job version from the gateway (local and container pools)
  run --run-id ID   run one Job-Run and exit (Kubernetes Jobs, one-shot mode)
  serve --port N    serve a class's methods (or an ASGI app) over HTTP (local services, Knative)
  check             import the entry once and exit (the builders run it: a deploy fails on an import error)

Both take their settings from the environment: OPBOX_GATEWAY_URL, OPBOX_ENTRY
(module:qualname), OPBOX_CODE_DIR, and a scoped token (OPBOX_WORKER_TOKEN / OPBOX_RUN_TOKEN).
"""

from __future__ import annotations

import argparse
import os
import sys


def sdk_calls_home() -> None:
    """The SDK in user code calls this process's own gateway and workspace with the token the platform gave
    it (OPBOX_TOKEN, a caller's token scoped to this run or service: jobs calling jobs); never elsewhere with
    it, whatever ``Resource.env`` set. Without one, user code has no token (and no credentials file)."""
    env = os.environ
    if env.get("OPBOX_TOKEN", "").startswith("obc_") and env.get("OPBOX_GATEWAY_URL"):
        env["OPBOX_URL"] = env["OPBOX_GATEWAY_URL"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opbox.runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("worker", help="pull runs of one job version from the gateway")
    run = sub.add_parser("run", help="run one Job-Run and exit")
    run.add_argument("--run-id", default=os.environ.get("OPBOX_RUN_ID"), help="default: $OPBOX_RUN_ID")
    serve = sub.add_parser("serve", help="serve a class's methods (or an ASGI app) over HTTP; see runtime/serve.py")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="default: $PORT or 8080")
    serve.add_argument("--fd", type=int, default=None, help="serve on this inherited, bound socket instead")
    check = sub.add_parser("check", help="import the entry once; exit 1 with the traceback if it fails")
    check.add_argument("--entry", default=os.environ.get("OPBOX_ENTRY"), help="default: $OPBOX_ENTRY")
    check.add_argument("--code-dir", default=os.environ.get("OPBOX_CODE_DIR"), help="default: $OPBOX_CODE_DIR")
    args = parser.parse_args(argv)
    os.environ["OPBOX_RUNTIME"] = "1"  # user code can tell; deploy() refuses to run here
    sdk_calls_home()
    if args.mode == "worker":
        from .worker import main as worker_main

        return worker_main()
    if args.mode == "check":
        if not args.entry:
            parser.error("check needs --entry or OPBOX_ENTRY")
        from .check import main as check_main

        return check_main(args.entry, args.code_dir)
    if args.mode == "serve":
        from .serve import main as serve_main

        return serve_main(args.host, args.port, args.fd)
    if not args.run_id:
        parser.error("run needs --run-id or OPBOX_RUN_ID")
    from .batch import main as batch_main

    return batch_main(args.run_id)


if __name__ == "__main__":
    sys.exit(main())
