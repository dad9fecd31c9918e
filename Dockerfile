# Development and test image: compilers, CMake and one MPI (the mpich wheel, pulled in by
# pip) in a pinned Debian-based Python image. The default command runs the test suite.
FROM python:3.11.7-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ make cmake ninja-build git procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir '.[test,examples]'

# MPICH refuses nothing as root, but set the thread count explicitly for benchmarks and MPI runs.
ENV OMP_NUM_THREADS=1
CMD ["python", "-m", "pytest", "-q"]
