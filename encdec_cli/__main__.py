from encdec_cli.cli import main

main()
