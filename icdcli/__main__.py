"""`python -m icdcli`: the same as the `icd` command."""

from icdcli.cli.main import main

main(prog_name="icd")
