"""`python -m edgepeft.cli`: the same command as `edgepeft`, every subcommand registered."""
from edgepeft.cli import main

if __name__ == "__main__":
    main()
