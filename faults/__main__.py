from faults.run import main

main()
