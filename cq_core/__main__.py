from cq_core.cli import main

main()
