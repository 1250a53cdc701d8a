from lorafit.cli import main

main()
