from leakhunt.cli import main

main()
