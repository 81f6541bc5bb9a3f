from vfm.cli import main

main()
