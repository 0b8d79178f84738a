from cq_core.cli.entry import main

main()
