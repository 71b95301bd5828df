"""`python mdwe.py PROGRAM ARGS...`: exec PROGRAM under the kernel's memory-deny-write-execute.

prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux 6.3+) is what systemd's
MemoryDenyWriteExecute= uses where the kernel has it: no mapping may be writable
and executable, or become executable. It survives fork and exec, so a neuron's
runners inherit it. Exit code 3: the kernel cannot do it.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        sys.exit(3)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
