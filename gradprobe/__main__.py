from gradprobe.cli.app import main

main()
