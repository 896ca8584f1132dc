"""`python -m conftrl.demo`: Serve a web page to try a trained adapter; the command is `conftrl.cli.demo`."""

from conftrl.cli.demo import main

if __name__ == "__main__":
    main()
