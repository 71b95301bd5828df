"""`python -m neuron.cli`: the same as the `neuron` command."""

from neuron.cli.main import main

raise SystemExit(main())
