from neftune_cli.cli import main

main()
