from neftune_cli.cli.app import main

main()
