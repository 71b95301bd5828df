"""`neuron join URL --code CODE`: trade a one-time join code for the fleet token, and keep it.

The token goes into a file only its owner reads (mode 0600), written atomically
(a temporary file beside it, fsynced, renamed over): the file neuron.toml's
`fleet_token_file` names, or, when it names none, `fleet-token` beside
neuron.toml, which then gains `fleet_token_file = "fleet-token"` (its other
lines, comments included, untouched). The token never enters neuron.toml.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import pwd
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from neuron.config import NeuronConfig
from shared.blocking_http import request_json
from shared.config import ConfigError, check_token, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_TOKEN_FILE = "fleet-token"

HELP = """\
Join a cortex fleet with a one-time code from `cortex join-code` (an admin runs
it on the cortex host). The code is sent to cortex (POST URL/join), which
answers the fleet token once; this writes the token into a mode-0600 file that
neuron.toml names (fleet_token_file), adding that key if it names none, and
says what to do next: restart the neuron so it serves with the token. A code
is good once, for minutes; a used, expired or mistyped one is refused.

Run it as the user the neuron runs as, or give --owner (as root: the file must
be readable by the neuron's service user, cortex-neuron under the shipped
systemd unit).

exit status: 0 joined, 1 refused (the code) or not written, 2 usage, config
             error or cortex unreachable

example:
  sudo neuron join http://10.0.0.10:9400 --code K7QF2-... \\
      -c /etc/cortex-neuron/neuron.toml --owner cortex-neuron
  sudo systemctl restart neuron"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "join",
        help="join a cortex fleet with a one-time code (writes the fleet token)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", metavar="URL", help="cortex's base URL, e.g. http://10.0.0.10:9400")
    p.add_argument("--code", required=True, help="the code `cortex join-code` printed")
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path("neuron.toml"),
        help="the neuron.toml to join with (default: ./neuron.toml)",
    )
    p.add_argument(
        "--owner",
        metavar="USER",
        help="give the token file to USER (and USER's group); needs root",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for cortex")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        config = load_config(NeuronConfig, args.config)  # the token file may not exist yet
        owner = _owner(args.owner)
    except (ConfigError, KeyError) as exc:
        print(f"neuron join: {exc}", file=err)
        return EXIT_USAGE
    url = args.url if "://" in args.url else f"http://{args.url}"
    url = url.rstrip("/")
    base = args.config.resolve().parent
    node_id = _node_id(config, base)
    body = {"code": args.code, "name": config.node_name or os.uname().nodename.split(".")[0]}
    if node_id:
        body["node_id"] = node_id
    try:
        status, answer, _ = request_json("POST", url + "/join", body, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"neuron join: cannot reach cortex at {url}: {exc}", file=err)
        return EXIT_USAGE
    if status != 200 or not isinstance(answer, dict):
        print(f"neuron join: cortex refused: {status}: {_message(answer)}", file=err)
        return EXIT_FAILED
    token = answer.get("fleet_token")
    try:
        check_token(str(token))
    except ValueError as exc:
        print(f"neuron join: cortex answered an unusable token: {exc}", file=err)
        return EXIT_FAILED
    try:
        done = keep_token(args.config, config, str(token), owner)
    except (OSError, ConfigError) as exc:
        print(f"neuron join: could not keep the token: {exc}", file=err)
        return EXIT_FAILED
    print("\n".join([*done, *_next_steps(config, bool(answer.get("discover")))]), file=out)
    return EXIT_OK


def keep_token(
    path: Path, config: NeuronConfig, token: str, owner: tuple[int, int] | None = None
) -> list[str]:
    """Write `token` where `path`'s config reads it (adding the key if needed); what was done."""
    base = path.resolve().parent
    done = []
    named = config.fleet_token_file
    target = Path(named or DEFAULT_TOKEN_FILE).expanduser()
    target = target if target.is_absolute() else base / target
    existed = target.exists()
    if owner is None and existed:
        st = target.stat()
        owner = (st.st_uid, st.st_gid)  # the neuron could read the old one: keep its owner
    write_atomic(target, token + "\n", mode=0o600, owner=owner)
    done.append(f"wrote the fleet token to {target} (mode 0600{_whose(owner)})")
    if named is None:
        line = tomli_w.dumps({"fleet_token_file": DEFAULT_TOKEN_FILE})
        text = path.read_text()
        st = path.stat()
        write_atomic(
            path, _insert_top(text, line), mode=st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid)
        )
        done.append(f'added fleet_token_file = "{DEFAULT_TOKEN_FILE}" to {path}')
    env = config.fleet_token_env
    if env and os.environ.get(env):
        done.append(f"note: ${env} is set here, and wins over the file when the neuron starts")
    # What `neuron serve` will read: the config must load and yield this token.
    NeuronConfig.from_file(path)
    return done


def write_atomic(path: Path, text: str, *, mode: int, owner: tuple[int, int] | None) -> None:
    """`text` into `path` whole or not at all, with `mode` from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # before any byte is written
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _insert_top(text: str, line: str) -> str:
    """`line` (a top-level key) before the first table or key, after the header comments."""
    lines = text.splitlines(keepends=True)
    at = 0
    while at < len(lines) and (not lines[at].strip() or lines[at].lstrip().startswith("#")):
        at += 1
    comment = "# Written by `neuron join`: the fleet token's file (mode 0600).\n"
    return "".join([*lines[:at], comment, line, *(["\n"] if at < len(lines) else []), *lines[at:]])


def _owner(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise KeyError(f"--owner: no user {user!r} on this machine") from None
    return pw.pw_uid, pw.pw_gid


def _whose(owner: tuple[int, int] | None) -> str:
    uid = os.geteuid() if owner is None else owner[0]
    try:
        return f", owned by {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f", owned by uid {uid}"


def _node_id(config: NeuronConfig, base: Path) -> str | None:
    """The node's persisted id, if it has run before (nothing is created here)."""
    store = Path(config.store_dir).expanduser()
    store = store if store.is_absolute() else base / store
    try:
        return (store / "node_id").read_text().strip().splitlines()[0] or None
    except (OSError, IndexError):
        return None


def _next_steps(config: NeuronConfig, discover: bool) -> list[str]:
    steps = [
        "",
        "next: restart the neuron so it serves with the token:",
        "  sudo systemctl restart neuron          (Linux, the shipped unit)",
        "  sudo launchctl kickstart -k system/org.cortex-neuron.neuron   (macOS)",
        "  or stop it and run: neuron serve -c neuron.toml",
    ]
    if _loopback(config.host):
        steps.append(
            f"note: this neuron listens on {config.host} only; set `host` to an address"
            " cortex can reach (its LAN address, or 0.0.0.0)"
        )
    elif discover and config.announce:
        steps.append("cortex discovers it over mDNS once it serves (discover = true there)")
    else:
        steps.append(
            "then add it to cortex.toml's [[neurons]] (name, url), unless cortex has"
            " discover = true and this neuron announce = true"
        )
    return steps


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:300]
