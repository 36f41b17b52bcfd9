"""`python -m worker.kernels`: build the CPU kernels now (scripts/bootstrap does), say if it worked."""

from worker.kernels import main

main()
