"""`cortex cancel [ID]`: end a request in flight (DELETE /v1/requests/ID), or list them."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO
from urllib.parse import quote

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_OK,
    ApiFailure,
    Target,
    add_connection_args,
    dump_json,
    run,
    table,
)

HELP = f"""\
End request ID wherever it runs (DELETE /v1/requests/ID): cortex interrupts it
and closes its connection to the node, whose runner stops at its next token.
The client gets the error `request_cancelled` (status 499): an SSE error frame
then `data: [DONE]` if its stream has begun, else the error answer. ID is the
request's X-Request-Id: the one the client sent, or the one cortex returned.

Without ID, list the requests in flight (GET /admin/requests): id, API, model,
node, key and age, oldest first.

The admin token cancels any request; an API key given as --token cancels the
requests it sent (403 for another key's).

{CONNECTION_HELP}

exit status: 0 cancelled (or listed), 1 no such request in flight,
             2 usage error, wrong token or cortex unreachable

examples:
  cortex cancel                       what is running now?
  cortex cancel 7f3a9c0e5d2b4e6f      end that one"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cancel",
        help="end a request in flight by its id (or list those in flight)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("id", nargs="?", help="the request id (X-Request-Id); none: list them")
    add_connection_args(p)
    p.add_argument("--json", action="store_true", help="the raw JSON answer")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return run(args, "cancel", lambda target: _cancel(args, target, out))


def _cancel(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    if args.id is None:
        return _list(args, target, out)
    status, answer = target.call("DELETE", f"/v1/requests/{quote(args.id, safe='')}")
    if status == 404:
        # Never sent, already over, or sent through another gateway: an answer, not a misuse.
        print(f"cortex cancel: {ApiFailure.of(status, answer).message}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200 or not isinstance(answer, dict):
        raise ApiFailure.of(status, answer)
    if args.json:
        print(dump_json(answer), file=out)
        return EXIT_OK
    where = f"on {answer.get('node')}" if answer.get("node") else "before reaching a node"
    ended = "" if answer.get("ended") else " (still unwinding)"
    print(f"{answer.get('cancelled')}: cancelled {where}{ended}", file=out)
    return EXIT_OK


def _list(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    answer = target.get_ok("/admin/requests")
    if args.json:
        print(dump_json(answer), file=out)
        return EXIT_OK
    rows = [
        [
            str(r.get("id")),
            str(r.get("api") or "-"),
            str(r.get("model") or "-"),
            str(r.get("node") or "-"),
            str(r.get("key") or "-"),
            f"{float(r.get('age_s') or 0):.1f}s",
        ]
        for r in answer.get("requests", [])
    ]
    if not rows:
        print("no request in flight", file=out)
        return EXIT_OK
    print(table(["id", "api", "model", "node", "key", "age"], rows), file=out)
    return EXIT_OK
