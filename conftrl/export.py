"""`python -m conftrl.export`: Merge an adapter into its base; the command is `conftrl.cli.export`."""

from conftrl.cli.export import main

if __name__ == "__main__":
    main()
