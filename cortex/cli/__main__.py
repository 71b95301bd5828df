"""`python -m cortex.cli`: the same as the `cortex` command."""

from cortex.cli.main import main

raise SystemExit(main())
