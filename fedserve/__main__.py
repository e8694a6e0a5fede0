from fedserve.cli import main

main()
