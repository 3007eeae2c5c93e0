from vidsparse.cli import main

main()
