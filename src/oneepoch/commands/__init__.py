"""One module per ``oneepoch`` subcommand (see :mod:`oneepoch.cli`)."""
