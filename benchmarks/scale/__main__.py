from benchmarks.scale import main

main()
