"""python -m devstack: start the local stack, print its endpoints and env exports, run until
Ctrl-C (or SIGTERM), then stop every process it started."""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading

from .procs import DevstackError
from .runtime_api import FunctionInitError
from .stack import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("--stills-handler", default="functions.stills.app.handler",
                        help="handler of the stills function ('' for none)")
    parser.add_argument("--api-handler", default="functions.api.app.handler",
                        help="handler of the api function ('' for none)")
    parser.add_argument("--functions", help="comma-separated names of the functions to run (default: every "
                        "function of template.yaml: stills,api,split,chunk-worker,session-chunk,failures,gpu-result)")
    parser.add_argument("--pythonpath", action="append", default=[], metavar="DIR",
                        help="extra PYTHONPATH entry for the functions (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment variable for the functions (repeatable)")
    parser.add_argument("--workdir", help="where logs go (default: a new temporary folder, kept)")
    parser.add_argument("--api-auth", choices=["none", "jwt", "iam"], default="none",
                        help="jwt: require a Bearer JWT (decoded, not verified); iam: require a SigV4 "
                             "Authorization header (not verified; the access key id is the caller)")
    parser.add_argument("--any-route", action="store_true",
                        help="send every path to the api function ($default route) instead of template.yaml's routes")
    parser.add_argument("--no-poll", action="store_true", help="start with the event deliveries paused")
    parser.add_argument("--no-gpu", action="store_true",
                        help="no local GPU endpoint (functions/gpu/server.py on CPU behind a SageMaker stand-in)")
    parser.add_argument("--init-timeout", type=float, default=180.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import tempfile
    workdir = args.workdir or tempfile.mkdtemp(prefix="faceflow-devstack-")
    function_env = dict(item.split("=", 1) for item in args.env)
    stack = Stack(stills_handler=args.stills_handler or None, api_handler=args.api_handler or None,
                  extra_pythonpath=args.pythonpath, function_env=function_env, workdir=workdir,
                  api_auth=args.api_auth, api_routes=None if args.any_route else "template", poll=not args.no_poll, init_timeout=args.init_timeout, wait_ready=False,
                  functions=[n.strip() for n in args.functions.split(",") if n.strip()] if args.functions else None,
                  gpu=False if args.no_gpu else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stack.start()
        print(stack.describe(), flush=True)
        for name, function in stack.functions.items():
            try:
                function.wait_ready(args.init_timeout)
                print(f"{name}: ready (pid {function.pid})", flush=True)
            except FunctionInitError as exc:
                print(f"{name}: INIT FAILED: {exc} (retrying; see {function.log_path})", flush=True)
            except DevstackError as exc:
                print(f"{name}: {exc} (see {function.log_path})", flush=True)
        if stack.gpu_worker is not None:
            try:
                stack.gpu_worker.wait_ready(args.init_timeout)
                print(f"gpu worker: ready ({stack.gpu_worker.url})", flush=True)
            except DevstackError as exc:
                print(f"gpu worker: {exc}", flush=True)
        print("\n# environment for clients:", flush=True)
        for key, value in stack.env.items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        print("\nrunning; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except DevstackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print(f"stopped; logs in {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
