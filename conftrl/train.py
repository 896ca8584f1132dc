"""`python -m conftrl.train`: Train a control adapter; the command is `conftrl.cli.train`."""

from conftrl.cli.train import main

if __name__ == "__main__":
    main()
