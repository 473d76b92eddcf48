from bucketer.cli import main

main()
