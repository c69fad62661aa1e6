from benchmarks.reliability import main

main()
