"""`python -m mythos_deploy.cli ...` is `mythos-export ...`."""

from mythos_deploy.cli import main

main()
