"""mdi-mpi: model-distributed inference of Llama-family models over MPI (recurrent pipeline parallelism)."""

__version__ = "0.1.0"
