import sys

from rlhf_jax import interrupts

interrupts.install()  # first: a Ctrl-C while the CLI imports also exits 130

from rlhf_jax.cli import main  # noqa: E402

sys.exit(main())
