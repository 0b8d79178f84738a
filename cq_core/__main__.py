from cq_core.cli.app import main

main()
